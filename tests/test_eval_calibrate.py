"""``streamguard calibrate`` on an overconfident detector: brightness with a silly gain on overlapping data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog
from click.testing import CliRunner

from streamguard.cli import cli
from streamguard.detectors.spec import Calibration
from test_eval_datasets import encoded, write

STEEP = json.dumps({"brightness": {"gain": 200}})


@pytest.fixture
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # the in-process CLI bound logging to CliRunner's stderr


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real brightness 0.35..0.60, fake 0.40..0.65: a gain of 200 is confidently wrong on the overlap.
    The manifest puts most images in ``val`` and a few in ``train``, which calibration must ignore."""
    root = tmp_path_factory.mktemp("calib")
    rows = []
    for i, b in enumerate(np.linspace(0.35, 0.60, 30)):
        write(root / "real" / f"r{i}.png", encoded(float(b), seed=i))
        rows.append({"path": f"real/r{i}.png", "label": "real", "split": "val" if i % 6 else "train"})
    for i, b in enumerate(np.linspace(0.40, 0.65, 30)):
        write(root / "fake" / f"f{i}.png", encoded(float(b), seed=100 + i))
        rows.append({"path": f"fake/f{i}.png", "label": "ai", "generator": "sd", "split": "val" if i % 6 else "train"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def calibrate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamguard", "calibrate", "--no-progress", *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_temperature_lowers_ece_and_is_saved(overlapping: Path, tmp_path: Path) -> None:
    out = tmp_path / "weights"
    proc = calibrate("--detector", "brightness", str(overlapping), "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache"), env={"STREAMGUARD_DETECTORS__OPTIONS": STEEP})
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"ECE ([\d.]+) -> ([\d.]+); log-loss ([\d.]+) -> ([\d.]+)", proc.stdout)
    assert match, proc.stdout
    ece_before, ece_after, loss_before, loss_after = map(float, match.groups())
    assert ece_after < ece_before / 2 and loss_after < loss_before
    cal = Calibration.load(out)
    assert cal.method == "temperature" and cal.bias == 0.0
    assert 0 < cal.scale < 0.5  # the fit softens a 200x gain
    assert "split=val n=50" in cal.fitted_on and "brightness=test-1" in cal.fitted_on
    assert json.loads((out / "calibration.json").read_text())["scale"] == cal.scale


@pytest.mark.usefixtures("_reset_logging")
def test_platt_and_usage_errors_in_process(overlapping: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_DETECTORS__OPTIONS", STEEP)
    out = tmp_path / "platt"
    args = ["calibrate", "--detector", "brightness", str(overlapping), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(cli, [*args, "--method", "platt", "--out", str(out)])
    assert result.exit_code == 0, result.output
    platt = Calibration.load(out)
    assert platt.method == "platt" and 0 < platt.scale < 0.5
    # The test detector has no weights directory: without --out there is nowhere to write.
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "no weights directory; pass --out" in result.output
    result = CliRunner().invoke(cli, [*args, "--out", str(out), "--split", "test"])
    assert result.exit_code == 2 and "no labelled images in split 'test'" in result.output
    result = CliRunner().invoke(cli, [*args[:2], "fused", *args[3:], "--out", str(out)])
    assert result.exit_code == 2 and "calibrate fits one detector" in result.output
