"""The shipped PiN-CLIP and MPFT weights: present with their model cards, loadable on the cached backbone
they were trained on, calibrated, and on by default in `scan` next to univfd."""

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
        assert spec.name == name and spec.version == DETECTORS[name].version(directory)
        assert spec.calibration.method == "temperature" and spec.triton_model == name
        outcomes = scorer.score([ImageJob("a", encode(_scene(1), "PNG")), ImageJob("b", encode(noise((300, 200)), "JPEG"))])
    for outcome in outcomes:
        (score,) = outcome.verdict.scores  # type: ignore[union-attr]
        assert score.error is None and score.probability is not None and 0.0 < score.probability < 1.0


def test_scan_uses_the_default_clip_detectors_and_pin_clip_only_when_enabled(tmp_path: Path) -> None:
    image = tmp_path / "scene.jpg"
    _scene(2).save(image, quality=90)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STREAMGUARD_PLUGINS__DENY")}
    proc = subprocess.run([sys.executable, "-m", "streamguard", "scan", "--format", "jsonl", str(image)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)["verdict"]
    assert {s["detector"] for s in verdict["scores"]} == {"univfd", "mpft", "provenance"}
    assert all(s["error"] is None for s in verdict["scores"])
    assert verdict["model_versions"]["univfd"].startswith("univfd-1+")
    proc = subprocess.run([sys.executable, "-m", "streamguard", "scan", "--format", "jsonl", str(image)],
                          capture_output=True, text=True, timeout=300,
                          env={**env, "STREAMGUARD_PLUGINS__ENABLE": '["builtin-pinclip"]'})
    assert proc.returncode == 0, proc.stderr
    assert "pin-clip" in {s["detector"] for s in json.loads(proc.stdout)["verdict"]["scores"]}
