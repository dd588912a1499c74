"""Content-matched fakes for univfd's probe (`streamguard.training.matched`): which photos the autoencoder
may learn on under leave-one-source-out, what a twin looks like, and that a twin leaves training with its
photo's group."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from images import encode, noise
from streamguard.config import IntakeSettings, load_settings
from streamguard.evaluation import load_samples
from streamguard.evaluation.datasets import FAKE, REAL, Sample
from streamguard.training.loso import Fold
from streamguard.training import matched as matched_module
from streamguard.training.matched import GENERATOR, MAX_SIDE, SUFFIX, Matcher, matched, reference_root
from streamguard.training.nirnet.autoencoder import AutoencoderConfig, TinyAutoencoder
from streamguard.training.probe_choice import Candidate, Embedded, choose_by_groups
from streamguard.training.univfd import TrainConfig, train_univfd


def _sample(root: str, source: str, i: int, label: int = REAL, split: str = "train") -> Sample:
    return Sample(id=f"{root}/{'real' if label == REAL else 'fake'}/{source}/{i}.png", path="x", member=None,
                  label=label, generator="real" if label == REAL else source,
                  family="real" if label == REAL else "diffusion", source=source if label == REAL else root,
                  split=split)


def test_the_autoencoder_learns_on_the_first_root_whose_photos_are_all_in_training() -> None:
    samples = [_sample("wild-train", "bsd", 0), _sample("wild-train", "imagenet", 1),
               _sample("wild-train", "gan", 2, FAKE), _sample("wild-more", "phones", 3)]
    assert reference_root(samples, ()) == "wild-train"
    assert reference_root(samples, ("imagenet",)) == "wild-more"
    assert reference_root(samples, ("phones",)) == "wild-train"
    # A root of generated images only teaches nothing about photos.
    assert reference_root([_sample("gens", "gan", 0, FAKE), *samples], ()) == "wild-train"
    with pytest.raises(ValueError, match="every root holds one of"):
        reference_root(samples, ("bsd", "phones"))


def _matcher() -> Matcher:
    torch.manual_seed(0)
    return Matcher(TinyAutoencoder(AutoencoderConfig()), "wild-train", IntakeSettings())


def test_a_twin_is_the_photos_reconstruction_at_a_generators_size_in_its_format() -> None:
    matcher = _matcher()
    photo = encode(noise((1024, 770), seed=1), "JPEG", quality=70)
    twin = matcher(photo)
    image = Image.open(io.BytesIO(twin))
    # A JPEG photo's twin is a JPEG in the photo's own tables: the format says nothing about the class.
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.quantization == Image.open(io.BytesIO(photo)).quantization
    assert min(image.size) == MAX_SIDE and image.size == (round(1024 * MAX_SIDE / 770), MAX_SIDE)
    assert matcher(photo) == twin  # deterministic: the embedding cache may keep it
    # A small photo keeps its pixels' size (no upscaling), odd sides included; a PNG photo's twin is a PNG.
    small = Image.open(io.BytesIO(matcher(encode(noise((101, 67), seed=2), "PNG"))))
    assert small.size == (101, 67) and small.format == "PNG"
    # Other weights are another version: their twins never share a cache entry.
    torch.manual_seed(1)
    other = Matcher(TinyAutoencoder(AutoencoderConfig()), "wild-train", IntakeSettings())
    assert other.version != matcher.version and matcher.version.startswith("wild-train-")


def test_a_twin_is_generated_under_its_own_id_and_keeps_its_photos_source() -> None:
    photo = _sample("wild-more", "phones", 7)
    twin = matched(photo)
    assert (twin.label, twin.generator, twin.source, twin.split) == (FAKE, GENERATOR, "phones", "train")
    assert twin.id == photo.id + SUFFIX  # its own id: never taken for its photo in a split, a pool or a cache


def test_twins_leave_inner_training_with_their_photos_group() -> None:
    rng = np.random.default_rng(0)
    train_samples = ([_sample("r", f"src{k}", i) for k in range(3) for i in range(6)]
                     + [_sample("r", f"gen{k}", i, FAKE) for k in range(3) for i in range(6)])
    val_samples = [_sample("r", s.source if s.label == REAL else s.generator, 100 + i, s.label, "val")
                   for i, s in enumerate(train_samples[::3])]

    def rows(n: int, marks: np.ndarray) -> np.ndarray:
        return np.concatenate([rng.normal(0, 1, (n, 4)), marks[:, None]], axis=1)

    reals = [s for s in train_samples if s.label == REAL]
    train = Embedded(rows(len(train_samples), np.zeros(len(train_samples))), np.arange(len(train_samples)),
                     train_samples)
    val = Embedded(rows(len(val_samples), np.zeros(len(val_samples))), np.arange(len(val_samples)), val_samples)
    # The last column numbers each twin (from 1), so a fit can tell which twins it was given.
    twins = Embedded(rows(len(reals), np.arange(1, len(reals) + 1, dtype=float)), np.arange(len(reals)),
                     [matched(s) for s in reals])
    seen: list[set[int]] = []

    def fit(cand: object, x: np.ndarray, y: np.ndarray) -> object:
        from sklearn.linear_model import LogisticRegression

        marks = x[:, -1].astype(int)
        seen.append(set(marks[marks > 0].tolist()))
        assert (y[marks > 0] == FAKE).all()
        return LogisticRegression().fit(x, y)

    folds = [Fold("a", generators=("gen0",), sources=("src0",)), Fold("b", generators=("gen1",), sources=("src1",))]
    chosen = choose_by_groups(train, val, [Candidate(1.0)], lambda x, c: x, fit, {}, folds, extra=twins)
    assert chosen is None or chosen[0] == Candidate(1.0)
    twin_source = {k + 1: s.source for k, s in enumerate(reals)}
    for fold, got in zip(folds, seen, strict=True):
        assert got == {k for k, source in twin_source.items() if source not in fold.sources}


def test_train_univfd_with_matched_fakes_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real training code and backbone, two tiny roots: the held-out source's root may not teach the
    autoencoder, the held-out photos get no twin, every other real training photo gets one."""
    for r, root in enumerate(("one", "two")):
        rows = ["path,label,generator,split"]
        for label, kind in ((0, "real"), (1, "ai")):
            for k in range(2):
                group = f"{root}-{kind}{k}"  # a real row's generator column is its source
                (tmp_path / root / group).mkdir(parents=True)
                for i, split in enumerate(("train",) * 3 + ("val",) * 2):
                    img = noise((96, 80), seed=1000 * r + 100 * label + 10 * k + i)
                    if label == 0:
                        img = img.resize((24, 20)).resize((96, 80))  # smooth photos, noisy fakes
                    img.save(tmp_path / root / group / f"{i}.png")
                    rows.append(f"{group}/{i}.png,{kind},{group},{split}")
        (tmp_path / root / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "weights"
    monkeypatch.setattr(matched_module, "AUTOENCODER_STEPS", 20)  # what is tested here is who learns, not how well
    report = train_univfd(load_settings(), TrainConfig(
        data=(str(tmp_path / "one"), str(tmp_path / "two")), out=out, holdout_sources=("one-real0",),
        matched_fakes=True, augment_draws=1, cache_dir=tmp_path / "cache"))
    # "one" holds the held-out photos: only "two" may teach the autoencoder.
    assert [p.name.split("-")[1] for p in (tmp_path / "cache").glob("matcher-*.pt")] == ["two"]
    samples = load_samples([str(tmp_path / "one"), str(tmp_path / "two")])
    expected = [s for s in samples if s.label == REAL and s.split == "train" and s.source != "one-real0"]
    assert len(expected) == 9 and report["counts"]["matched"] == len(expected)  # type: ignore[index]
    assert json.loads((out / "meta.json").read_text())["matched_fakes"] is True
    assert report["held_out_original"]  # the held-out photos are scored, twinless


def test_loso_folds_record_the_twins_recipe_and_only_probes_take_twins(tmp_path: Path) -> None:
    from streamguard.training.loso import LosoConfig, run_settings

    base = {"data": ("d",), "loso_data": ("d",), "out": tmp_path}
    plain = LosoConfig(**base, methods=("univfd-blocks",))  # type: ignore[arg-type]
    twinned = LosoConfig(**base, methods=("univfd-blocks", "pin-clip"), matched_fakes=True)  # type: ignore[arg-type]
    # A fold trained without twins, or on an earlier twin recipe, is not taken for one trained with these.
    assert "matched_fakes" not in run_settings(plain, "univfd-blocks")
    assert run_settings(twinned, "univfd-blocks")["matched_fakes"] == matched_module.TWIN_FORMAT
    assert "matched_fakes" not in run_settings(twinned, "pin-clip")
    with pytest.raises(ValueError, match="matched fakes are for the probe methods"):
        LosoConfig(**base, methods=("pin-clip",), matched_fakes=True)  # type: ignore[arg-type]
