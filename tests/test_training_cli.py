"""`streamguard train pin-clip|mpft` end to end on a tiny CLIP and images the tests make: the files it
writes, resuming, seeded determinism, hold-outs, and the trained detector scoring through `scan`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image
from safetensors.torch import load_file
from structlog.testing import capture_logs

from streamguard.cli import cli
from streamguard.config import load_settings
from streamguard.plugins import build_plugin_manager
from streamguard.registry import collect_detectors
from streamguard.scoring import Scorer
from streamguard.builtin.cliphead import HEAD_FILE, LORA_FILE, META_FILE, TRAINING_FILE
from streamguard.training.held_out import load_held_out
from test_training_units import tiny_clip

DETECTOR_FILES = {LORA_FILE, HEAD_FILE, META_FILE, TRAINING_FILE, "calibration.json"}
# (generator or source, label, counts per split): reals are smooth scenes, fakes high-frequency texture.
GROUPS = (("photos", "real", {"train": 10, "val": 4, "test": 4}),
          ("noisegen", "ai", {"train": 10, "val": 4, "test": 4}),
          ("blockgen", "ai", {"train": 4, "val": 0, "test": 2}))


def smooth(seed: int, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + seed)], axis=-1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8))


def textured(seed: int, size: int = 96, block: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // block, size // block, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip(0).save_pretrained(path)
    return path


def write_dataset(root: Path, images: Iterable[tuple[str, str, str, int, Image.Image]]) -> Path:
    """A manifest dataset of ``(group, label, split, seed, image)``: ``group/seed.png`` and ``manifest.csv``."""
    rows = []
    for name, label, split, seed, image in images:
        (root / name).mkdir(exist_ok=True)
        image.save(root / name / f"{seed}.png")
        rows.append({"path": f"{name}/{seed}.png", "label": label, "generator": name, "split": split})
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "generator", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def images() -> Iterator[tuple[str, str, str, int, Image.Image]]:
        seed = 0
        for name, label, counts in GROUPS:
            for split, count in counts.items():
                for _ in range(count):
                    seed += 1
                    image = smooth(seed) if label == "real" else textured(seed, block=1 if name == "noisegen" else 4)
                    yield name, label, split, seed, image

    return write_dataset(tmp_path_factory.mktemp("data"), images())


def _env(backbone: Path, **extra: str) -> dict[str, str]:
    return {"STREAMGUARD_BACKBONE__CHECKPOINT": str(backbone), "STREAMGUARD_LOG__FORMAT": "json",
            "STREAMGUARD_LOG__LEVEL": "warning", **extra}


def train(method: str, dataset: Path, out: Path, cache: Path, backbone: Path, *extra: str) -> Result:
    args = ["train", method, "--data", str(dataset), "--out", str(out), "--cache-dir", str(cache),
            "--batch-size", "8", "--lr", "0.02", "--no-progress", *extra]
    return CliRunner().invoke(cli, args, env=_env(backbone))


def _ok(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    return json.loads(result.stdout)


def scan(backbone: Path, detector: str, weights: Path, *paths: Path) -> dict[str, float]:
    """The detector's probability per file name, from `streamguard scan --format jsonl`."""
    plugin = f"builtin-{detector.replace('-', '')}"
    deny = [p for p in ("builtin-univfd", "builtin-pinclip", "builtin-mpft") if p != plugin]
    env = _env(backbone, STREAMGUARD_PLUGINS__DENY=json.dumps([*deny, "brightness"]),
               STREAMGUARD_PLUGINS__ENABLE=json.dumps([plugin]),  # mpft is opt-in (pin-clip: a no-op)
               STREAMGUARD_DETECTORS__OPTIONS=json.dumps({detector: {"weights_dir": str(weights)}}))
    result = CliRunner().invoke(cli, ["scan", "--format", "jsonl", *map(str, paths)], env=env)
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}"
    probabilities = {}
    for line in result.stdout.splitlines():
        record = json.loads(line)
        (score,) = [s for s in record["verdict"]["scores"] if s["detector"] == detector]
        assert score["error"] is None and score["version"].startswith(f"{detector}-1+")
        probabilities[Path(record["path"]).name] = score["probability"]
    return probabilities


def _history(out: Path) -> list[dict[str, Any]]:
    epochs = json.loads((out / TRAINING_FILE).read_text())["epochs"]
    return [{k: v for k, v in e.items() if k not in ("seconds", "images_per_s")} for e in epochs]


@pytest.fixture(scope="module")
def mpft_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path, backbone: Path) -> tuple[Path, Path]:
    """Two epochs, then resumed to three: (weights folder, cache folder)."""
    root = tmp_path_factory.mktemp("mpft")
    out, cache = root / "out", root / "cache"
    first = _ok(train("mpft", dataset, out, cache, backbone, "--epochs", "2"))
    assert first["version"].startswith("mpft-1+")
    assert len(_history(out)) == 2
    _ok(train("mpft", dataset, out, cache, backbone, "--epochs", "3", "--resume"))
    return out, cache


def test_train_mpft_writes_the_detector_files(mpft_run: tuple[Path, Path], backbone: Path) -> None:
    out, _ = mpft_run
    assert DETECTOR_FILES <= {p.name for p in out.iterdir()}
    report = json.loads((out / TRAINING_FILE).read_text())
    meta = json.loads((out / META_FILE).read_text())
    assert report["method"] == "mpft" and report["mode"] == "texture"
    assert report["counts"] == {"train": 24, "val": 8, "test": 10, "held_out": 0}
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3]
    assert all(e["val"]["auc"] is not None for e in report["epochs"])
    assert report["epochs"][-1]["train_loss"] < report["epochs"][0]["train_loss"]
    assert {"overall", "per_generator", "per_source"} <= set(report["test"])
    assert meta["tuned_blocks"] == [2, 3] and meta["lora"]["rank"] == 8
    assert json.loads((out / "calibration.json").read_text())["method"] == "temperature"
    adapters = load_file(str(out / LORA_FILE))
    assert sorted(adapters) == sorted(f"vision_model.encoder.layers.{i}.self_attn.{p}.lora_{x}"
                                      for i in (2, 3) for p in ("q_proj", "v_proj") for x in "AB")
    assert all(float(adapters[k].abs().max()) > 0 for k in adapters if k.endswith("lora_B"))  # B left zero


def test_resumed_run_equals_an_uninterrupted_seeded_run(mpft_run: tuple[Path, Path], dataset: Path,
                                                         backbone: Path, tmp_path: Path) -> None:
    resumed, cache = mpft_run
    straight = tmp_path / "straight"
    _ok(train("mpft", dataset, straight, cache, backbone, "--epochs", "3"))
    assert _history(straight) == _history(resumed)
    for name in (LORA_FILE, HEAD_FILE, "calibration.json"):
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name
    other_seed = tmp_path / "seed1"
    _ok(train("mpft", dataset, other_seed, cache, backbone, "--epochs", "1", "--seed", "1"))
    assert (other_seed / LORA_FILE).read_bytes() != (straight / LORA_FILE).read_bytes()


def test_resume_under_another_recipe_is_refused(mpft_run: tuple[Path, Path], dataset: Path,
                                                backbone: Path) -> None:
    out, cache = mpft_run
    result = train("mpft", dataset, out, cache, backbone, "--epochs", "4", "--resume", "--mode", "random")
    assert result.exit_code != 0
    assert "written by another recipe (differs in config)" in result.stderr
    missing = train("mpft", dataset, out.parent / "nowhere", cache, backbone, "--resume")
    assert missing.exit_code != 0 and "no checkpoint" in missing.stderr


def test_trained_mpft_scores_images_through_scan(mpft_run: tuple[Path, Path], backbone: Path,
                                                 tmp_path: Path) -> None:
    out, _ = mpft_run
    smooth(1001).save(tmp_path / "real.jpg", quality=90)
    textured(1002).save(tmp_path / "fake.jpg", quality=90)
    probabilities = scan(backbone, "mpft", out, tmp_path / "real.jpg", tmp_path / "fake.jpg")
    assert probabilities["fake.jpg"] > probabilities["real.jpg"]


def test_adapters_for_another_backbone_are_refused(mpft_run: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = mpft_run
    cases = {
        "wider": (tiny_clip(0, hidden_size=48, intermediate_size=96), "made for a CLIP with 4 blocks of width 32"),
        "same shape, other weights": (tiny_clip(1), "were trained on backbone"),
    }
    for name, (model, message) in cases.items():
        model.save_pretrained(tmp_path / name)
        settings = load_settings(backbone={"checkpoint": str(tmp_path / name)},
                                 plugins={"deny": ["builtin-univfd", "builtin-pinclip", "brightness", "provenance"],
                                          "enable": ["builtin-mpft"]},
                                 detectors={"options": {"mpft": {"weights_dir": str(out)}}})
        with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
            (runner,) = scorer.runners
            assert runner.load_error is not None and message in runner.load_error, name
            assert "retrain it with `streamguard train mpft`" in runner.load_error


def test_train_pinclip_with_a_held_out_generator_then_scan(dataset: Path, backbone: Path, tmp_path: Path) -> None:
    out = tmp_path / "pin"
    summary = _ok(train("pin-clip", dataset, out, tmp_path / "cache", backbone, "--epochs", "3",
                        "--holdout-generator", "blockgen"))
    assert summary["version"].startswith("pin-clip-1+") and summary["mode"] == "learned"
    report = json.loads((out / TRAINING_FILE).read_text())
    # Every blockgen image (4 train, 2 test) is test now, beside the usual test split of the rest.
    assert report["counts"] == {"train": 20, "val": 8, "test": 14, "held_out": 6}
    assert report["test"]["per_generator"]["blockgen"]["n_fake"] == 6
    assert set(report["epochs"][0]["train_parts"]) == {"bce_clean", "bce_noisy", "kl"}
    smooth(2001).save(tmp_path / "real.jpg", quality=90)
    textured(2002).save(tmp_path / "fake.jpg", quality=90)
    probabilities = scan(backbone, "pin-clip", out, tmp_path / "real.jpg", tmp_path / "fake.jpg")
    assert probabilities["fake.jpg"] > probabilities["real.jpg"]
    # The held-out images' scores are what the detector says of their original bytes in production.
    holdout, held = load_held_out(out)
    assert holdout == {"generators": ["blockgen"], "sources": []} and len(held) == 6
    assert {s.generator for s in held} == {"blockgen"} and {s.split for s in held} == {"train", "test"}
    served = scan(backbone, "pin-clip", out, *(dataset / "blockgen" / Path(s.id).name for s in held))
    for s in held:
        assert 1 / (1 + math.exp(-s.logit)) == pytest.approx(served[Path(s.id).name], abs=1e-4)


def test_train_pinclip_with_renders_and_feed_twins_in_its_real_class(dataset: Path, backbone: Path,
                                                                     tmp_path: Path) -> None:
    """`--rendered-screens` and `--feed-twins` reach the fine-tuned detector's training as real samples; the
    held-out scores are the data's images alone, and the recorded command trains the same again."""
    out = tmp_path / "pin"
    _ok(train("pin-clip", dataset, out, tmp_path / "cache", backbone, "--epochs", "1", "--mode", "none",
              "--holdout-generator", "blockgen", "--rendered-screens", "2", "--feed-twins", "3"))
    report = json.loads((out / TRAINING_FILE).read_text())
    assert report["counts"] == {"train": 20 + 2 + 3, "val": 8, "test": 14, "held_out": 6}
    assert "--rendered-screens 2 --feed-twins 3" in report["command"]
    meta = json.loads((out / META_FILE).read_text())
    assert meta["recipe"]["rendered_screens"][0] == 2 and meta["recipe"]["feed_twins"][0] == 3
    _, held = load_held_out(out)
    assert len(held) == 6 and {s.generator for s in held} == {"blockgen"}


def test_plugins_register_nothing_until_weights_exist(tmp_path: Path) -> None:
    options = {name: {"weights_dir": str(tmp_path / name)} for name in ("mpft", "pin-clip")}
    settings = load_settings(plugins={"deny": ["builtin-univfd"], "enable": ["builtin-pinclip", "builtin-mpft"]},
                             detectors={"options": options})
    with capture_logs() as logs:
        names = {spec.name for spec in collect_detectors(build_plugin_manager(settings.plugins), settings)}
    assert "pin-clip" not in names and "mpft" not in names and "provenance" in names
    missing = [e for e in logs if e["event"] == "detector.weights_missing"]
    assert sorted(e["detector"] for e in missing) == ["mpft", "pin-clip"]
    assert all(e["log_level"] == "warning" for e in missing)
    assert {e["weights_dir"] for e in missing} == {str(tmp_path / "mpft"), str(tmp_path / "pin-clip")}


def test_modes_are_the_methods_own() -> None:
    result = CliRunner().invoke(cli, ["train", "mpft", "--data", ".", "--mode", "gaussian"])
    assert result.exit_code == 2 and "'gaussian' is not one of 'texture', 'random', 'none'" in result.stderr
