"""The built-in univfd detector with the real CLIP weights (made by the set-up's `backbone fetch`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from images import encode, noise
from streamguard.builtin.cliphead.detector import head_reads
from streamguard.builtin.cliphead.model import LinearProbe
from streamguard.builtin.univfd.plugin import WEIGHTS_DIR
from streamguard.config import load_settings
from streamguard.detectors.spec import CLASS_TOKENS, Calibration
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer
from streamguard.training.artifacts import save_probe


# univfd on, the other CLIP detectors off: this file is about univfd (they have tests of their own).
OTHER_CLIP = ["builtin-pinclip", "builtin-mpft"]


@pytest.fixture(autouse=True)
def _with_univfd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_PLUGINS__DENY", json.dumps(OTHER_CLIP))


def _scene(seed: int, size: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + seed)], axis=-1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def test_shipped_weights_load_and_score() -> None:
    assert (WEIGHTS_DIR / "head.safetensors").is_file() and (WEIGHTS_DIR / "MODEL_CARD.md").is_file()
    settings = load_settings(plugins={"deny": ["brightness", "provenance", *OTHER_CLIP]})
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        (spec,) = scorer.specs
        assert spec.name == "univfd" and spec.version.startswith("univfd-1+")
        assert spec.calibration.method == "temperature"
        outcomes = scorer.score([ImageJob("a", encode(_scene(1), "PNG")), ImageJob("b", encode(noise((300, 200)), "JPEG"))])
    for outcome in outcomes:
        (score,) = outcome.verdict.scores  # type: ignore[union-attr]
        assert score.error is None and score.probability is not None and 0.0 < score.probability < 1.0


def test_head_of_the_wrong_width_is_a_clear_error(tmp_path: Path) -> None:
    save_probe(LinearProbe(768), tmp_path, {"embed_dim": 768})
    settings = load_settings(plugins={"deny": ["brightness", "provenance", *OTHER_CLIP]},
                             detectors={"options": {"univfd": {"weights_dir": str(tmp_path)}}})
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        (runner,) = scorer.runners
        assert runner.load_error is not None and "retrain it with `streamguard train univfd`" in runner.load_error


def test_train_univfd_end_to_end(tmp_path: Path) -> None:
    """Real training code, real backbone, tiny data: it writes a head that loads and separates the classes."""
    data = tmp_path / "data"
    for label, folder in ((0, "real"), (1, "fake")):
        (data / folder).mkdir(parents=True)
        for i in range(14):
            # Class signal the frozen encoder sees: smooth scenes vs. high-frequency noise.
            img = _scene(100 + i, 128) if label == 0 else noise((128, 128), seed=200 + i)
            img.save(data / folder / f"{i}.png")
    out = tmp_path / "weights"
    env = {k: v for k, v in os.environ.items() if k != "STREAMGUARD_PLUGINS__DENY"}
    proc = subprocess.run(
        [sys.executable, "-m", "streamguard", "train", "univfd", "--data", str(data), "--out", str(out),
         "--seed", "3"],
        capture_output=True, text=True, timeout=600, env={**env, "STREAMGUARD_LOG__FORMAT": "json"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["version"].startswith("univfd-1+")
    assert {"head.safetensors", "meta.json", "calibration.json", "training.json"} <= {p.name for p in out.iterdir()}
    # By default the probe reads every block's class token, as the shipped univfd does.
    assert head_reads(out / "head.safetensors") == CLASS_TOKENS
    assert json.loads((out / "meta.json").read_text())["embed_dim"] == 12 * 768
    calibration = Calibration.load(out)
    assert calibration.method == "temperature" and calibration.scale > 0
    settings = load_settings(plugins={"deny": ["brightness", "provenance", *OTHER_CLIP]},
                             detectors={"options": {"univfd": {"weights_dir": str(out)}}})
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        real, fake = scorer.score([ImageJob("r", encode(_scene(999, 128), "PNG")),
                                   ImageJob("f", encode(noise((128, 128), seed=999), "PNG"))])
    p_real = real.verdict.scores[0].probability  # type: ignore[union-attr]
    p_fake = fake.verdict.scores[0].probability  # type: ignore[union-attr]
    assert p_real is not None and p_fake is not None and p_fake > p_real


def test_worker_uses_univfd_by_default(kafka, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import signal

    from stack import Topics, WorkerProcess, image_events, produce, wait_for_outcomes, worker_env

    topics = Topics(kafka.address).create()
    env = worker_env(topics, None, STREAMGUARD_PLUGINS__DENY=json.dumps(OTHER_CLIP))
    env.pop("PYTHONPATH", None)  # the product's plugins only
    worker = WorkerProcess(env, tmp_path)
    try:
        sent = produce(topics, image_events([encode(_scene(5), "JPEG"), encode(noise((96, 96)), "PNG")]))
        outcomes = wait_for_outcomes(topics, sent, timeout=120)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    for verdict in outcomes.verdicts:
        scores = {s["detector"]: s for s in verdict["scores"]}
        assert set(scores) == {"univfd", "provenance"}
        assert scores["univfd"]["error"] is None and scores["univfd"]["probability"] is not None
