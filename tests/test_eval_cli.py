"""``streamguard eval`` as a user runs it: a real process, datasets in three layouts, the real plugins."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from streamguard.cli import cli
from test_eval_datasets import cifake_tar, encoded, labelled_dirs, manifest_dir, write

RUNS = ["none", "jpeg95", "jpeg75", "jpeg50", "jpeg30", "blur1", "blur2", "blur3", "normalized"]


def streamguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamguard", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("eval-data")
    cnn = base / "cnn"
    labelled_dirs(cnn / "progan" / "cat", "0_real", "1_fake", 3)
    labelled_dirs(cnn / "stylegan", "0_real", "1_fake", 3, seed=10)
    write(cnn / "stylegan" / "1_fake" / "broken.png", encoded(0.8)[:120])  # truncated: a decode error
    return [cnn, cifake_tar(base / "cifake-train.tar", 4), manifest_dir(base / "wild", 3)]


@pytest.fixture(scope="module")
def first_run(datasets: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    work = tmp_path_factory.mktemp("eval-out")
    out, cache = work / "out1", work / "cache"
    proc = streamguard("eval", *map(str, datasets), "--detector", "brightness", "--perturb", "jpeg,blur",
                       "--out", str(out), "--cache-dir", str(cache), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("progan", "stylegan", "stable-diffusion-1.4", "dalle-mini", "overall:", "normalization gap"):
        assert name in proc.stdout, proc.stdout
    yield out, cache


def test_eval_writes_the_report(first_run: tuple[Path, Path]) -> None:
    out, _ = first_run
    for name in ("metrics.json", "run.json", "scores.csv", "report.md", "roc.png", "generators.png",
                 "perturbations.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["detector"] == "brightness" and metrics["versions"] == {"brightness": "test-1"}
    assert metrics["perturbations"] == RUNS
    raw = metrics["results"]["none"]
    assert raw["overall"]["auc"] == 1.0 and raw["overall"]["accuracy"] == 1.0
    assert set(raw["per_generator"]) == {"progan", "stylegan", "stable-diffusion-1.4", "dalle-mini"}
    assert raw["per_generator"]["dalle-mini"]["n_real"] == raw["overall"]["n_real"] == 13  # all reals
    assert set(raw["per_source"]) == {"progan", "stylegan", "cifar10", "imagenet-photos"}
    assert metrics["counts"]["samples"] == 27 and metrics["counts"]["fake"] == 14
    assert metrics["errors"]["count"] == len(RUNS) and set(metrics["errors"]["by_type"]) == {"CorruptImage"}
    assert {e["id"] for e in metrics["errors"]["items"]} == {"cnn/stylegan/1_fake/broken.png"}
    assert metrics["normalization_gap"]["overall"]["auc"] == 0.0
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 27 * len(RUNS)
    assert {r["perturbation"] for r in rows} == set(RUNS)
    tar_row = next(r for r in rows if r["member"])
    assert tar_row["member"].startswith(("REAL/", "FAKE/")) and tar_row["path"].endswith("cifake-train.tar")
    assert all((float(r["score"]) > 0.5) == (r["label"] == "1") for r in rows if r["score"])
    report = (out / "report.md").read_text()
    assert "## Per generator" in report and "](roc.png)" in report and "## Format/resolution shortcut" in report


def test_rerun_is_identical_and_served_from_the_cache(datasets: list[Path], first_run: tuple[Path, Path]) -> None:
    out, cache = first_run
    out2 = out.parent / "out2"
    proc = streamguard("eval", *map(str, datasets), "--detector", "brightness", "--perturb", "jpeg,blur",
                       "--out", str(out2), "--cache-dir", str(cache), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert (out2 / "metrics.json").read_bytes() == (out / "metrics.json").read_bytes()
    assert (out2 / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()
    run = json.loads((out2 / "run.json").read_text())
    assert run["cache_hits"] == 26 * len(RUNS)  # every image that scored; the broken one is retried
    # Only the raw broken image reaches the Scorer again; perturbing it fails at the perturbation's decode.
    assert run["scored"] == 1 and run["errors"] == len(RUNS)
    assert f"cache_hits={26 * len(RUNS)}" in proc.stdout


@pytest.mark.usefixtures("_reset_logging")
def test_fused_in_process(datasets: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "fused"
    result = CliRunner().invoke(cli, ["eval", str(datasets[0]), "--detector", "fused", "--no-normalized-check",
                                      "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["detector"] == "fused" and metrics["perturbations"] == ["none"]
    assert set(metrics["versions"]) == {"brightness", "provenance", "policy"}
    assert metrics["results"]["none"]["overall"]["auc"] == 1.0
    assert not (out / "perturbations.png").exists()


@pytest.fixture
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # the in-process CLI bound logging to CliRunner's stderr


@pytest.mark.usefixtures("_reset_logging")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--detector", "nope"], "no detector named 'nope'"),
        (["--detector", "brightness", "--perturb", "sepia"], "unknown perturbation 'sepia'"),
        (["--detector", "brightness", "--split", "nosuch"], "no labelled images found in split 'nosuch'"),
    ],
)
def test_usage_errors_exit_2(datasets: list[Path], tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["eval", str(datasets[0]), "--cache-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.usefixtures("_reset_logging")
def test_missing_data_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "nowhere"), "--detector", "brightness"])
    assert result.exit_code == 2 and "does not exist" in result.output
