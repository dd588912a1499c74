"""`streamguard scan` as a user runs it: a real process, real files, real plugins from entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from images import animated_gif, encode, noise, png_bomb, solid, truncated_jpeg

GOOD = {"photo.jpg", "bright.png", "pic.webp", "anim.gif"}
BAD = {
    "truncated.jpg": "CorruptImage",
    "empty.jpg": "EmptyImage",
    "readme.jpg": "UnsupportedFormat",
    "bomb.png": "TooLarge",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scan")
    (root / "sub").mkdir()
    (root / "photo.jpg").write_bytes(encode(noise((320, 240)), "JPEG"))
    (root / "bright.png").write_bytes(encode(solid(250), "PNG"))
    (root / "sub" / "pic.webp").write_bytes(encode(solid(5), "WEBP"))
    (root / "sub" / "anim.gif").write_bytes(animated_gif())
    (root / "truncated.jpg").write_bytes(truncated_jpeg())
    (root / "empty.jpg").write_bytes(b"")
    (root / "readme.jpg").write_text("just text\n")
    (root / "bomb.png").write_bytes(png_bomb())
    (root / "notes.txt").write_text("not an image extension: skipped when walking a directory\n")
    return root


def scan(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamguard", "scan", "--no-progress", *args],
        capture_output=True, text=True, input=stdin, timeout=300, env=None if env is None else {**os.environ, **env},
    )


def test_scan_folder_reports_each_file_and_exits_1(folder: Path) -> None:
    proc = scan(str(folder), "--format", "jsonl")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = {Path(r["path"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == GOOD | set(BAD)
    for name in GOOD:
        verdict = rows[name]["verdict"]
        assert rows[name]["ok"] and verdict["label"] in ("ai_generated", "real", "uncertain")
        assert {s["detector"] for s in verdict["scores"]} == {"brightness", "provenance"}
    for name, error in BAD.items():
        assert not rows[name]["ok"] and rows[name]["error"]["type"] == error, rows[name]
        assert rows[name]["error"]["message"]
    assert rows["bright.png"]["verdict"]["label"] == "ai_generated"
    assert rows["pic.webp"]["verdict"]["label"] == "real"


def test_scan_table_format(folder: Path) -> None:
    proc = scan(str(folder))
    assert proc.returncode == 1
    assert "8 files, 4 judged, 4 failed" in proc.stdout
    assert "TooLarge" in proc.stdout and "ai_generated" in proc.stdout


def test_scan_good_files_exit_0_and_globs(folder: Path) -> None:
    proc = scan(str(folder / "*.png").replace("bomb", ""), str(folder / "photo.jpg"), "--format", "jsonl")
    names = [Path(json.loads(line)["path"]).name for line in proc.stdout.splitlines()]
    assert names == ["bomb.png", "bright.png", "photo.jpg"]
    proc = scan(str(folder / "sub" / "**" / "*.gif"), str(folder / "photo.jpg"), "--format", "jsonl")
    assert proc.returncode == 0, proc.stdout
    assert [Path(json.loads(line)["path"]).name for line in proc.stdout.splitlines()] == ["anim.gif", "photo.jpg"]


def test_scan_reads_paths_from_stdin_and_reports_missing(folder: Path) -> None:
    listing = f"{folder / 'bright.png'}\n\n{folder / 'missing.png'}\n"
    proc = scan("-", "--format", "jsonl", stdin=listing)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["ok"] for r in rows] == [True, False]
    assert rows[1]["error"]["type"] == "NotFound"
    assert proc.returncode == 1


def test_scan_with_detector_denied_in_config(folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "sg.toml"
    config.write_text('[plugins]\ndeny = ["provenance", "builtin-univfd", "builtin-pinclip", "builtin-mpft"]\n')
    env = {k: v for k, v in os.environ.items() if k != "STREAMGUARD_PLUGINS__DENY"}  # env beats the file
    proc = subprocess.run(
        [sys.executable, "-m", "streamguard", "--config", str(config), "scan", "--format", "jsonl",
         str(folder / "bright.png")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    (row,) = map(json.loads, proc.stdout.splitlines())
    assert [s["detector"] for s in row["verdict"]["scores"]] == ["brightness"]


def test_scan_logs_are_json_on_stderr_when_not_a_terminal(folder: Path) -> None:
    proc = scan(str(folder / "bright.png"), "--format", "jsonl")
    events = [json.loads(line)["event"] for line in proc.stderr.splitlines() if line.startswith("{")]
    assert "detector.loaded" in events


def test_scan_progress_bar_goes_to_stderr(folder: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "streamguard", "scan", "--progress", "--format", "jsonl", str(folder)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert "scanning" in proc.stderr  # the bar, drawn on stderr
    assert len(proc.stdout.splitlines()) == 8  # stdout keeps one JSON line per file


# The worker's budget set far below what the (deliberately slow) test detector takes on a batch.
SLOW_DETECTOR = {"STREAMGUARD_DETECTORS__TIMEOUT_S": "0.1",
                 "STREAMGUARD_DETECTORS__OPTIONS": '{"brightness": {"delay_s": 0.6}}'}


def test_scan_waits_for_a_slow_detector(folder: Path) -> None:
    proc = scan(str(folder / "bright.png"), "--format", "jsonl", env=SLOW_DETECTOR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = map(json.loads, proc.stdout.splitlines())
    scores = {s["detector"]: s for s in row["verdict"]["scores"]}
    assert scores["brightness"]["error"] is None and scores["brightness"]["probability"] > 0.5


def test_scan_detector_timeout_option(folder: Path) -> None:
    proc = scan(str(folder / "bright.png"), "--format", "jsonl", "--detector-timeout", "0.1", env=SLOW_DETECTOR)
    (row,) = map(json.loads, proc.stdout.splitlines())
    scores = {s["detector"]: s for s in row["verdict"]["scores"]}
    assert scores["brightness"]["error"] == "timed out after 0.1s"
