"""Night-mode twins in univfd's real class (`streamguard.training.night`): what a twin is, that it is the same
in every fold and draw, and that a held-out source's photos never reach training as twins; with the renders,
the one end-to-end training run of univfd's extra real rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from images import encode, noise, tiny_root
from streamguard.config import load_settings
from streamguard.evaluation.datasets import FAKE, REAL, Sample
from streamguard.training.data import is_held_out
from streamguard.training.loso import LosoConfig, run_settings
from streamguard.training.night import MAX_SIDE, NIGHT_VERSION, SUFFIX, NightMode, night_photos, night_twin
from streamguard.training.renders import RENDER_VERSION, SOURCE as RENDERS
from streamguard.training.univfd import TrainConfig, train_univfd


def scene(size: tuple[int, int]) -> Image.Image:
    """A photo-like scene: smooth gradients and a few shapes, so a twin's content can be compared."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    red = 255 * xx / w
    green = 255 * yy / h
    blue = 128 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    pixels = np.stack([red, green, blue], axis=-1)
    pixels[h // 4: h // 2, w // 4: w // 2] = (250, 250, 240)  # a bright window
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def luminance(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("L").resize(size), np.float32).ravel()


def test_a_twin_is_a_noisy_processed_jpeg_of_the_same_scene_reproducible_from_the_photo() -> None:
    photo = encode(scene((1600, 1000)), "JPEG", quality=92)
    night = NightMode()
    twin = night(photo)
    assert twin == night(photo)  # the same in every fold and draw
    assert twin != night(encode(scene((1600, 1000)), "JPEG", quality=91))
    image = Image.open(io.BytesIO(twin))
    assert image.format == "JPEG"
    assert min(image.size) <= MAX_SIDE and abs(image.width / image.height - 1.6) < 0.01
    original = Image.open(io.BytesIO(photo))
    a, b = luminance(original, (160, 100)), luminance(image, (160, 100))
    assert np.corrcoef(a, b)[0, 1] > 0.8  # the same scene...
    assert np.abs(a - b).mean() > 5  # ...under other light and processing
    # ...with its flat areas no longer flat: shot and read noise survive the denoise.
    flat = np.asarray(image.convert("L"), np.float32)[image.height // 4 + 20: image.height // 2 - 20,
                                                     image.width // 4 + 20: image.width // 2 - 20]
    source_flat = np.asarray(original.convert("L"), np.float32)[250 + 20: 500 - 20, 400 + 20: 800 - 20]
    assert flat.std() > source_flat.std() + 0.5


def test_a_small_photo_keeps_its_size() -> None:
    image = Image.open(io.BytesIO(NightMode()(encode(noise((120, 90)), "PNG"))))
    assert image.size == (120, 90)


def sample(sid: str, source: str, label: int = REAL) -> Sample:
    return Sample(id=sid, path=f"{sid}.png", member=None, label=label, generator="real" if label == REAL else "g",
                  family="real" if label == REAL else "diffusion", source=source, split="train")


def test_the_chosen_photos_are_seeded_and_do_not_depend_on_order() -> None:
    photos = [sample(f"p{i:02d}", f"src{i % 3}") for i in range(20)]
    chosen = night_photos(photos, 5, seed=0)
    assert len(chosen) == 5 and chosen == night_photos(list(reversed(photos)), 5, seed=0)
    assert chosen != night_photos(photos, 5, seed=1)
    assert night_photos(photos, 50, seed=0) == sorted(photos, key=lambda s: s.id)  # all, when asked for more
    with pytest.raises(ValueError, match="real photos only"):
        night_photos(photos + [sample("f", "gen", FAKE)], 5, seed=0)


def test_a_twin_is_real_and_leaves_with_its_photos_source() -> None:
    twin = night_twin(sample("root/p1", "phones"))
    assert twin.id == "root/p1" + SUFFIX and twin.label == REAL and twin.source == "phones"
    assert is_held_out(twin, (), ("phones",)) and not is_held_out(twin, (), ("other",))


def test_train_univfd_with_renders_and_night_twins_end_to_end(tmp_path: Path) -> None:
    """Real training code and backbone on a tiny root: renders and night twins join the real class together,
    none of the twins is made of the held-out source's photos, both are recorded in the weights' meta, and
    the held-out scores hold neither."""
    tiny_root(tmp_path / "d")
    out = tmp_path / "weights"
    report = train_univfd(load_settings(), TrainConfig(
        data=(str(tmp_path / "d"),), out=out, holdout_sources=("real0",), rendered_screens=3, night_twins=6,
        augment_draws=1, cache_dir=tmp_path / "cache"))
    counts = report["counts"]
    assert counts["rendered"] == 3  # type: ignore[index]
    assert counts["night"] == 3  # type: ignore[index]  # all six train photos chosen; real0's three left
    assert report["train_rows"] == counts["train"] + 3 + 3  # type: ignore[index]  # fitted on, one row each
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rendered_screens"] == [3, RENDER_VERSION] and meta["night_twins"] == [6, NIGHT_VERSION]
    held = json.loads((out / "held_out.json").read_text())
    assert held["scores"] and not any(SUFFIX in str(s) or RENDERS in str(s) for s in held["scores"])


@pytest.mark.parametrize(("field", "version", "refusal"), [
    ("night_twins", NIGHT_VERSION, "night-mode twins are for the probe methods"),
    ("rendered_screens", RENDER_VERSION, "rendered screens are for the probe methods"),
])
def test_loso_folds_record_extra_real_rows_and_only_probes_take_them(tmp_path: Path, field: str, version: int,
                                                                     refusal: str) -> None:
    base = {"data": ("d",), "loso_data": ("d",), "out": tmp_path}
    plain = LosoConfig(**base, methods=("univfd-blocks",))  # type: ignore[arg-type]
    extra = LosoConfig(**base, methods=("univfd-blocks", "pin-clip"), **{field: 50})  # type: ignore[arg-type]
    assert field not in run_settings(plain, "univfd-blocks")
    assert run_settings(extra, "univfd-blocks")[field] == [50, version]  # a changed recipe trains again
    assert field not in run_settings(extra, "pin-clip")
    with pytest.raises(ValueError, match=refusal):
        LosoConfig(**base, methods=("pin-clip",), **{field: 5})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be 0 or more"):
        LosoConfig(**base, methods=("univfd-blocks",), **{field: -1})  # type: ignore[arg-type]
