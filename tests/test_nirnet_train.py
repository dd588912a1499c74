"""`streamguard train nirnet` end to end on tiny images, a tiny NIRNet and a tiny stand-in CLIP: the files it
writes load in the `builtin-nirnet` plugin and score; seeded determinism; resuming; ablations; hold-outs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import torch
from click.testing import CliRunner, Result
from PIL import Image
from structlog.testing import capture_logs
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from images import encode
from streamguard.backbone import load_backbone
from streamguard.builtin.nirnet.files import WEIGHTS_FILE, read_config
from streamguard.cli import cli
from streamguard.config import BackboneSettings, load_settings
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer
from streamguard.training.held_out import load_held_out
from streamguard.training.nirnet.imprint import load_imprints
from streamguard.training.nirnet.recipe import NirnetRecipe
from streamguard.training.nirnet.train import IMPRINTS_FILE, train_nirnet
from test_nirnet_simulator import save_tiny_vae

EMBED = 16
SIZE = 48  # image side; crops of 32 leave room for random positions
# (group, label, counts per split): reals are smooth scenes, fakes blocky or noisy texture.
GROUPS = (("photos", "real", {"train": 6, "val": 3, "test": 1}),
          ("noisegen", "ai", {"train": 3, "val": 2, "test": 1}),
          ("blockgen", "ai", {"train": 3, "val": 1, "test": 1}))
TINY_ARGS = ("--crop-size", "32", "--crops", "2", "--serve-crops", "2", "--extractor-depth", "2", "--width", "8",
             "--feature-dim", "8", "--hidden-dim", "8", "--batch-size", "4", "--lr", "0.01", "--no-progress")
OTHERS = ["brightness", "provenance", "builtin-univfd", "builtin-pinclip", "builtin-mpft", "builtin-credentials"]


def smooth(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + seed)], axis=-1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8))


def textured(seed: int, block: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (SIZE // block, SIZE // block, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((SIZE, SIZE), Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest dataset, ``group/seed.png`` + ``manifest.csv``, as `eval` and the other trainers read it."""
    root = tmp_path_factory.mktemp("nirnet-data")
    rows = []
    seed = 0
    for name, label, counts in GROUPS:
        (root / name).mkdir()
        for split, count in counts.items():
            for _ in range(count):
                seed += 1
                image = smooth(seed) if label == "real" else textured(seed, 1 if name == "noisegen" else 4)
                image.save(root / name / f"{seed}.png")
                rows.append({"path": f"{name}/{seed}.png", "label": label, "generator": name, "split": split})
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "generator", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=EMBED, num_hidden_layers=2,
                              num_attention_heads=2, patch_size=8, image_size=32, hidden_act="quick_gelu")
    path = tmp_path_factory.mktemp("nirnet-train-clip") / "clip"
    CLIPVisionModelWithProjection(config).eval().save_pretrained(path)
    return path


def train(dataset: Path, out: Path, clip: Path, *extra: str) -> Result:
    args = ["train", "nirnet", "--data", str(dataset), "--out", str(out), "--cache-dir", str(out.parent / "cache"),
            *TINY_ARGS, *extra]
    env = {"STREAMGUARD_BACKBONE__CHECKPOINT": str(clip), "STREAMGUARD_LOG__FORMAT": "json",
           "STREAMGUARD_LOG__LEVEL": "warning"}
    return CliRunner().invoke(cli, args, env=env)


def ok(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}\n{result.exception!r}"
    return json.loads(result.stdout)


def report(out: Path) -> dict[str, Any]:
    return json.loads((out / "training.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path, clip_dir: Path) -> Path:
    """Two epochs, all branches, simulator on (denoiser residuals)."""
    out = tmp_path_factory.mktemp("full") / "out"
    summary = ok(train(dataset, out, clip_dir, "--epochs", "2", "--seed", "3"))
    assert summary["version"].startswith("nirnet-1+") and summary["residual_source"] == "denoiser"
    return out


def _score(weights: Path, clip: Path, *images: Image.Image) -> list[Any]:
    settings = load_settings(backbone={"checkpoint": str(clip)}, plugins={"deny": OTHERS, "enable": ["builtin-nirnet"]},
                             detectors={"options": {"nirnet": {"weights_dir": str(weights)}}, "timeout_s": None})
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        (runner,) = scorer.runners
        assert runner.load_error is None, runner.load_error
        outcomes = scorer.score([ImageJob(f"img-{i}", encode(img, "PNG")) for i, img in enumerate(images)])
    scores = []
    for outcome in outcomes:
        assert outcome.verdict is not None, outcome.error
        (score,) = outcome.verdict.scores
        assert score.detector == "nirnet" and score.error is None, score
        scores.append(score)
    return scores


def test_train_writes_a_model_the_plugin_loads_and_scores_with(full_run: Path, clip_dir: Path) -> None:
    out = full_run
    assert {WEIGHTS_FILE, "config.json", "calibration.json", IMPRINTS_FILE, "meta.json", "MODEL_CARD.md",
            "training.json"} <= {p.name for p in out.iterdir()}
    config = read_config(out)
    assert config.crop_size == 32 and config.crops == 2 and config.extractor_depth == 2
    assert config.branches == ("noise", "frequency", "semantic") and config.semantic_dim == EMBED
    assert config.backbone == load_backbone(BackboneSettings(checkpoint=clip_dir)).version
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["method"] == "temperature" and "val split" in calibration["fitted_on"]
    imprints = load_imprints(out / IMPRINTS_FILE)
    assert imprints and {s.residual for s in imprints.values()} == {"denoiser-median3"}
    # Fitted on the 6 training fakes only, never the validation or test ones.
    assert sum(s.images for s in imprints.values()) == 6
    assert report(out)["simulator"]["fitted_on"]["fakes"] == 6
    card = (out / "MODEL_CARD.md").read_text()
    assert "residual source `denoiser`" in card and "denoiser-median3" in card and "--seed 3" in card
    assert "Difference-Aware Loss: off (it needs a VAE encoder" in card and report(out)["difference_loss"] is None
    meta = json.loads((out / "meta.json").read_text())
    assert meta["residual_source"] == "denoiser" and meta["seed"] == 3 and meta["command"].startswith(
        "streamguard train nirnet --data ")
    assert "Imprint simulator statistics measured with: denoiser-median3" in meta["imprints"]
    assert meta["validation"]["auc"] is not None
    run = report(out)
    assert len(run["epochs"]) == 2 and all(e["simulated"] > 0 for e in run["epochs"])
    assert run["counts"] == {"train": 12, "val": 6, "test": 3, "held_out": 0}

    scores = _score(out, clip_dir, smooth(100), textured(101, 1))
    assert all(s.version == run["version"] and 0.0 <= s.probability <= 1.0 for s in scores)


def test_same_seed_gives_the_same_weights(full_run: Path, dataset: Path, clip_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    ok(train(dataset, again, clip_dir, "--epochs", "2", "--seed", "3"))
    assert (again / WEIGHTS_FILE).read_bytes() == (full_run / WEIGHTS_FILE).read_bytes()
    other = tmp_path / "other"
    ok(train(dataset, other, clip_dir, "--epochs", "1", "--seed", "4"))
    assert (other / WEIGHTS_FILE).read_bytes() != (full_run / WEIGHTS_FILE).read_bytes()


def test_resumed_run_equals_the_uninterrupted_one(full_run: Path, dataset: Path, clip_dir: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok(train(dataset, out, clip_dir, "--epochs", "1", "--seed", "3"))
    assert len(report(out)["epochs"]) == 1
    ok(train(dataset, out, clip_dir, "--epochs", "2", "--seed", "3", "--resume"))
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in report(out)["epochs"]]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in report(full_run)["epochs"]]
    assert (out / WEIGHTS_FILE).read_bytes() == (full_run / WEIGHTS_FILE).read_bytes()
    # Another recipe does not resume this checkpoint.
    refused = train(dataset, out, clip_dir, "--epochs", "3", "--seed", "3", "--jpeg-share", "0.5", "--resume")
    assert refused.exit_code == 1 and "another recipe" in refused.stderr


def test_the_difference_aware_loss_through_an_operator_s_vae(full_run: Path, dataset: Path, clip_dir: Path,
                                                             tmp_path: Path) -> None:
    vae = tmp_path / "tiny-vae"
    save_tiny_vae(vae)
    out = tmp_path / "aware"
    ok(train(dataset, out, clip_dir, "--epochs", "2", "--seed", "3", "--difference-vae", str(vae),
             "--difference-weight", "0.5"))
    run = report(out)
    assert run["difference_loss"]["weight"] == 0.5 and run["difference_loss"]["vae"].startswith("vae-tiny-vae-")
    assert all(e["difference_loss"] is not None and 0 < e["difference_loss"] for e in run["epochs"])
    card = (out / "MODEL_CARD.md").read_text()
    assert "Difference-Aware Loss: on, through `vae-tiny-vae-" in card
    assert f"--difference-vae {vae} --difference-weight 0.5" in run["command"]
    # The loss moved the weights (same seed and data as full_run, which trained without it); serving is as
    # without it: the projection is training-only.
    assert (out / WEIGHTS_FILE).read_bytes() != (full_run / WEIGHTS_FILE).read_bytes()
    (score,) = _score(out, clip_dir, smooth(7))
    assert 0.0 <= score.probability <= 1.0
    # Resumed, the loss's projection comes back too: the same weights as the uninterrupted run.
    resumed = tmp_path / "resumed"
    common = ("--seed", "3", "--difference-vae", str(vae), "--difference-weight", "0.5")
    ok(train(dataset, resumed, clip_dir, "--epochs", "1", *common))
    ok(train(dataset, resumed, clip_dir, "--epochs", "2", *common, "--resume"))
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in report(resumed)["epochs"]]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in run["epochs"]]
    assert (resumed / WEIGHTS_FILE).read_bytes() == (out / WEIGHTS_FILE).read_bytes()


def test_the_difference_aware_loss_refuses_what_it_cannot_use(dataset: Path, clip_dir: Path, tmp_path: Path) -> None:
    missing = train(dataset, tmp_path / "o", clip_dir, "--difference-vae", str(tmp_path / "nope"))
    assert missing.exit_code == 1 and "--difference-vae: VAE weights not found" in missing.stderr
    alone = train(dataset, tmp_path / "o", clip_dir, "--difference-vae", str(tmp_path), "--no-simulator")
    assert alone.exit_code == 1 and "needs the simulator" in alone.stderr
    semantic = train(dataset, tmp_path / "o", clip_dir, "--difference-vae", str(tmp_path), "--branches", "semantic")
    assert semantic.exit_code == 1 and "only the noise and frequency branches read" in semantic.stderr


def test_no_simulator_and_a_branch_subset(dataset: Path, clip_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    summary = ok(train(dataset, out, clip_dir, "--epochs", "1", "--no-simulator", "--branches", "noise,frequency"))
    assert summary["residual_source"] is None and summary["branches"] == ["noise", "frequency"]
    config = read_config(out)
    assert config.branches == ("noise", "frequency") and config.backbone is None
    assert not (out / IMPRINTS_FILE).exists()
    assert report(out)["epochs"][0]["simulated"] == 0
    assert "Simulator: off" in (out / "MODEL_CARD.md").read_text()
    assert "--no-simulator" in json.loads((out / "meta.json").read_text())["command"]
    (score,) = _score(out, clip_dir, smooth(7))
    assert 0.0 <= score.probability <= 1.0


def test_bad_branches_are_refused(dataset: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["train", "nirnet", "--data", str(dataset), "--branches", "noise,colour"])
    assert result.exit_code == 2 and "subset of noise,frequency,semantic" in result.stderr


def test_held_out_generator_never_reaches_training_or_the_imprints(dataset: Path, tmp_path: Path) -> None:
    """Through the function LOSO will call per fold; the autoencoder residual source, trained here."""
    out = tmp_path / "fold"
    recipe = NirnetRecipe(data=(str(dataset),), out=out, cache_dir=tmp_path / "cache", epochs=1, batch_size=4,
                          crop_size=32, crops=1, serve_crops=1, extractor_depth=2, width=8, feature_dim=8,
                          hidden_dim=8, branches=("noise",), residual_source="autoencoder", autoencoder_steps=3,
                          holdout_generators=("blockgen",))
    structlog.reset_defaults()  # an earlier CLI run may have left the level at warning
    with capture_logs() as logs:
        run = train_nirnet(load_settings(), recipe)
    (start,) = [e for e in logs if e["event"] == "nirnet.train_start"]
    assert start["train_generators"] == ["noisegen"] and start["held_out"] == 5
    (trained,) = [e for e in logs if e["event"] == "nirnet.autoencoder_trained"]
    assert trained["images"] == 9 and trained["generators"] == ["noisegen"]  # training split: 6 photos, 3 fakes
    fitted = run.report["simulator"]["fitted_on"]
    assert fitted["generators"] == ["noisegen"] and fitted["fakes"] == 3 and fitted["images"] == 3
    assert fitted["residual"].startswith("autoencoder-x4") and fitted["autoencoder_images"] == 9
    assert run.report["train_groups"]["generators"] == ["noisegen"]
    assert run.report["counts"] == {"train": 9, "val": 5, "test": 7, "held_out": 5}
    assert "autoencoder" in (out / "MODEL_CARD.md").read_text()
    holdout, scores = load_held_out(out)
    assert holdout["generators"] == ["blockgen"]
    assert {s.generator for s in scores if s.label == 1} == {"blockgen"} and len(scores) == 5


def test_clip_embeddings_are_cached_between_runs(dataset: Path, clip_dir: Path, tmp_path: Path) -> None:
    """Every fold of a leave-one-source-out run embeds the same images: the second run reads the first's."""
    first = tmp_path / "first"
    ok(train(dataset, first, clip_dir, "--epochs", "1", "--seed", "5"))
    (cache,) = (tmp_path / "cache").glob("nirnet-clip-*.npz")
    stored = np.load(cache)
    assert len(stored["ids"]) == sum(sum(c.values()) for _, _, c in GROUPS) and stored["x"].shape[1] == EMBED
    again = tmp_path / "again"
    ok(train(dataset, again, clip_dir, "--epochs", "1", "--seed", "5"))
    assert (again / WEIGHTS_FILE).read_bytes() == (first / WEIGHTS_FILE).read_bytes()
    # Read, not recomputed: other embeddings in the cache make other weights.
    np.savez(cache, ids=stored["ids"], x=np.zeros_like(stored["x"]))
    tampered = tmp_path / "tampered"
    ok(train(dataset, tampered, clip_dir, "--epochs", "1", "--seed", "5"))
    assert (tampered / WEIGHTS_FILE).read_bytes() != (first / WEIGHTS_FILE).read_bytes()


def test_each_class_has_half_the_say_in_the_loss() -> None:
    from streamguard.training.nirnet.train import class_balanced

    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    weights = class_balanced(labels)
    assert float((weights * labels).sum()) == pytest.approx(float((weights * (1 - labels)).sum()))
    assert float(weights.mean()) == pytest.approx(1.0)
    assert torch.equal(class_balanced(torch.ones(3)), torch.ones(3))  # one class: nothing to balance
