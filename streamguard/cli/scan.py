"""``streamguard scan``: judge image files locally, no broker, no Redis, no Triton."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import click
import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from streamguard.cli.context import AppContext, detector_timeout_option
from streamguard.scan_inputs import Missing, expand
from streamguard.scoring import ImageJob, Outcome, Scorer

log = structlog.get_logger(__name__)
pass_app = click.make_pass_decorator(AppContext)

# Progress is only worth drawing when a run takes a while.
_PROGRESS_MIN_FILES = 16


@dataclass(frozen=True)
class ScanResult:
    path: str
    outcome: Outcome | None = None
    error_type: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None

    def as_json(self) -> dict[str, Any]:
        if self.ok and self.outcome is not None and self.outcome.verdict is not None:
            return {"path": self.path, "ok": True, "verdict": self.outcome.verdict.model_dump(mode="json")}
        return {"path": self.path, "ok": False, "error": {"type": self.error_type, "message": self.error}}


@click.command("scan")
@click.argument("paths", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl"]), default="table", show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
@detector_timeout_option
@pass_app
def scan_command(app: AppContext, paths: tuple[str, ...], fmt: str, progress: bool | None,
                 detector_timeout_s: float | None) -> None:
    """Judge image files: PATHS are files, directories (recursive), globs, or - to read paths from stdin.

    Prints one result per file; exits 1 when any file could not be judged."""
    settings = app.offline_settings(detector_timeout_s)
    items = list(expand(paths, sys.stdin))
    show_progress = progress if progress is not None else (sys.stderr.isatty() and len(items) >= _PROGRESS_MIN_FILES)
    results: list[ScanResult] = []
    emit = _jsonl_writer if fmt == "jsonl" else results.append
    failed = False
    with Scorer(settings, app.plugin_manager) as scorer, _Progress(show_progress, len(items)) as advance:
        for batch in _batches(items, settings.detectors.batch_size):
            for result in _scan_batch(scorer, batch):
                failed |= not result.ok
                emit(result)
                advance()
    if fmt == "table":
        _print_table(results)
    sys.exit(1 if failed else 0)


def _scan_batch(scorer: Scorer, batch: Sequence[Path | Missing]) -> list[ScanResult]:
    entries: list[ScanResult | ImageJob] = []
    for item in batch:
        if isinstance(item, Missing):
            entries.append(ScanResult(item.argument, error_type="NotFound", error="no such file or no match"))
            continue
        try:
            entries.append(ImageJob(key=str(item), data=item.read_bytes()))
        except OSError as exc:
            entries.append(ScanResult(str(item), error_type="ReadError", error=exc.strerror or str(exc)))
    jobs = [entry for entry in entries if isinstance(entry, ImageJob)]
    try:
        by_key = {outcome.key: outcome for outcome in scorer.score(jobs)}
    except Exception as exc:  # noqa: BLE001 - a bug on one batch must not end a long scan
        log.exception("scan.batch_failed")
        message = f"{type(exc).__name__}: {exc}"
        return [e if isinstance(e, ScanResult) else ScanResult(e.key, error_type="InternalError", error=message)
                for e in entries]
    return [e if isinstance(e, ScanResult) else _from_outcome(by_key[e.key]) for e in entries]


def _from_outcome(outcome: Outcome) -> ScanResult:
    if outcome.error is not None:
        return ScanResult(outcome.key, outcome, outcome.error.error_type, str(outcome.error))
    return ScanResult(outcome.key, outcome)


def _batches(items: list[Path | Missing], size: int) -> Iterator[list[Path | Missing]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _jsonl_writer(result: ScanResult) -> None:
    sys.stdout.write(json.dumps(result.as_json()) + "\n")
    sys.stdout.flush()


class _Progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self._bar = (
            Progress(
                TextColumn("scanning"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            if enabled
            else None
        )
        self._total = total

    def __enter__(self):  # type: ignore[no-untyped-def]
        if self._bar is None:
            return lambda: None
        self._bar.start()
        task = self._bar.add_task("scan", total=self._total)
        return lambda: self._bar.advance(task)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _print_table(results: list[ScanResult]) -> None:
    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(show_lines=False)
    for column in ("path", "label", "p(ai)", "detectors"):
        table.add_column(column, overflow="fold")
    for r in results:
        verdict = r.outcome.verdict if r.outcome else None
        if verdict is None:
            table.add_row(r.path, "[red]error[/red]", "", f"{r.error_type}: {r.error}")
            continue
        detail = ", ".join(
            f"{s.detector}={s.probability:.3f}" if s.probability is not None else f"{s.detector}: {s.error or 'abstained'}"
            for s in verdict.scores
        )
        p = "" if verdict.probability is None else f"{verdict.probability:.3f}"
        table.add_row(r.path, verdict.label, p, detail or "no detectors")
    console.print(table)
    bad = sum(not r.ok for r in results)
    console.print(f"{len(results)} files, {len(results) - bad} judged, {bad} failed")
