"""The shipped PiN-CLIP and MPFT weights: present with their model cards, loadable on the cached backbone
they were trained on, calibrated; pin-clip on by default in `scan` beside univfd, mpft only when enabled, and
measured by name in `eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from images import encode, noise
from PIL import Image
from test_eval_datasets import labelled_dirs

from streamguard.backbone import load_backbone
from streamguard.builtin.cliphead import HEAD_FILE, LORA_FILE, META_FILE, TRAINING_FILE
from streamguard.builtin.mpft.plugin import DETECTOR as MPFT
from streamguard.builtin.pinclip.plugin import DETECTOR as PINCLIP
from streamguard.config import BackboneSettings, load_settings
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer

DETECTORS = {"pin-clip": PINCLIP, "mpft": MPFT}
SHIPPED = {name: detector.default_weights for name, detector in DETECTORS.items()}
PLUGINS = {"pin-clip": "builtin-pinclip", "mpft": "builtin-mpft"}


def _scene(seed: int, size: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + seed)], axis=-1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_weights_are_small_documented_and_score(name: str) -> None:
    directory = SHIPPED[name]
    files = {p.name for p in directory.iterdir()}
    assert {LORA_FILE, HEAD_FILE, META_FILE, TRAINING_FILE, "calibration.json", "MODEL_CARD.md"} <= files
    assert sum(p.stat().st_size for p in directory.iterdir()) < 5 * 1024 * 1024  # adapters + head, not an encoder
    meta = json.loads((directory / META_FILE).read_text())
    assert meta["backbone"] == load_backbone(BackboneSettings()).version
    card = (directory / "MODEL_CARD.md").read_text()
    assert DETECTORS[name].version(directory) in card  # the card describes these weights, not older ones

    settings = load_settings(plugins={"allow": ["builtin-fusion", "builtin-policy", PLUGINS[name]], "deny": []})
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        (spec,) = scorer.specs
        # Served as the plugin's default view says (`default_view`), on the weights the card describes.
        detector = DETECTORS[name]
        assert spec.name == name and spec.version == detector.version(directory, view=detector.default_view)
        assert spec.served_version == detector.version(directory)
        assert spec.calibration.method == "temperature" and spec.triton_model == name
        outcomes = scorer.score([ImageJob("a", encode(_scene(1), "PNG")), ImageJob("b", encode(noise((300, 200)), "JPEG"))])
    for outcome in outcomes:
        (score,) = outcome.verdict.scores  # type: ignore[union-attr]
        assert score.error is None and score.probability is not None and 0.0 < score.probability < 1.0


def test_scan_uses_univfd_and_pin_clip_by_default_and_mpft_only_when_enabled(tmp_path: Path) -> None:
    image = tmp_path / "scene.jpg"
    _scene(2).save(image, quality=90)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STREAMGUARD_PLUGINS__DENY")}
    proc = subprocess.run([sys.executable, "-m", "streamguard", "scan", "--format", "jsonl", str(image)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)["verdict"]
    assert {s["detector"] for s in verdict["scores"]} == {"univfd", "pin-clip", "provenance"}
    assert all(s["error"] is None for s in verdict["scores"])
    assert verdict["model_versions"]["univfd"].startswith("univfd-1+")
    assert verdict["model_versions"]["pin-clip"] == PINCLIP.version(PINCLIP.default_weights, view=PINCLIP.default_view)
    proc = subprocess.run([sys.executable, "-m", "streamguard", "scan", "--format", "jsonl", str(image)],
                          capture_output=True, text=True, timeout=300,
                          env={**env, "STREAMGUARD_PLUGINS__ENABLE": '["builtin-mpft"]'})
    assert proc.returncode == 0, proc.stderr
    assert {"univfd", "pin-clip", "mpft"} <= {s["detector"] for s in json.loads(proc.stdout)["verdict"]["scores"]}


def test_eval_measures_the_opt_in_mpft_by_name_unless_it_is_denied(tmp_path: Path) -> None:
    # The validation's commands (`eval --detector mpft`) run without enabling mpft in the configuration.
    labelled_dirs(tmp_path / "data", "0_real", "1_fake", 2)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STREAMGUARD_PLUGINS__DENY")}
    args = [sys.executable, "-m", "streamguard", "eval", str(tmp_path / "data"), "--detector", "mpft",
            "--perturb", "none", "--no-normalized-check", "--no-cache", "--no-progress", "--out", str(tmp_path / "out")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    served = MPFT.version(MPFT.default_weights, view=MPFT.default_view)
    assert metrics["detector"] == "mpft" and metrics["versions"] == {"mpft": served}
    assert metrics["results"]["none"]["overall"]["n_fake"] == 2
    denied = subprocess.run(args, capture_output=True, text=True, timeout=300,
                            env={**env, "STREAMGUARD_PLUGINS__DENY": '["builtin-mpft"]'})
    assert denied.returncode == 2 and "no detector named 'mpft'" in denied.stderr, denied.stderr
