"""``streamguard eval`` and ``streamguard calibrate``: thin over `streamguard.evaluation`.

Both exit non-zero only for usage errors (unknown detector, no data, nowhere to write); images that cannot
be scored are counted and listed, never a failure of the command. scikit-learn, scipy and matplotlib are
imported inside the commands: at module level they would add seconds to every ``streamguard`` command,
the worker's start included.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click
import structlog
from rich.console import Console
from rich.table import Table

from streamguard.cli.context import AppContext, detector_timeout_option
from streamguard.detectors.spec import Calibration
from streamguard.evaluation.datasets import load_samples
from streamguard.evaluation.perturb import NONE, parse_perturbations
from streamguard.evaluation.runner import DEFAULT_CACHE_DIR, FUSED, EvalRunner, ScoredSample, UnknownDetector
from streamguard.extras import require
from streamguard.scoring import ConfigurationError

if TYPE_CHECKING:
    from streamguard.evaluation.harness import EvalResult
    from streamguard.evaluation.metrics import BinaryMetrics

log = structlog.get_logger(__name__)
pass_app = click.make_pass_decorator(AppContext)

_data_argument = click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
_cache_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE_DIR, show_default=True,
    help="Score cache (sqlite); reruns only read and hash images.",
)


@click.command("eval")
@_data_argument
@click.option("--detector", required=True, help="A detector name, or 'fused' for the fused verdict.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write metrics.json, scores.csv, report.md and plots here.")
@click.option("--perturb", "perturb_spec", default=NONE, show_default=True,
              help="Robustness sweep: none, all, or a comma list of jpeg, blur, downscale, social, jpeg75, ...")
@click.option("--normalized-check/--no-normalized-check", default=True, show_default=True,
              help="Also score every image as JPEG q=90 at 256x256 and report the gap (format/size shortcut).")
@click.option("--limit-per-group", type=click.IntRange(min=1), help="At most N images per (label, generator/source).")
@click.option("--split", help="Only this split (train/val/test); data without splits gets a seeded one.")
@click.option("--seed", type=int, default=0, show_default=True, help="Split assignment and subsampling.")
@_cache_option
@click.option("--no-cache", is_flag=True, help="Neither read nor write the score cache.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Images per Scorer call (default: detectors.batch_size).")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: on a terminal).")
@detector_timeout_option
@pass_app
def eval_command(
    app: AppContext, data: tuple[Path, ...], detector: str, out: Path | None, perturb_spec: str,
    normalized_check: bool, limit_per_group: int | None, split: str | None, seed: int, cache_dir: Path,
    no_cache: bool, batch_size: int | None, progress: bool | None, detector_timeout_s: float | None,
) -> None:
    """Measure a detector on labelled DATA (directories, tar archives, manifest CSV/JSONL files)."""
    require("`streamguard eval`", "eval")
    from streamguard.evaluation.harness import EvalConfig, run_evaluation
    from streamguard.evaluation.report import write_report

    try:
        perturbations = parse_perturbations(perturb_spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--perturb") from None
    config = EvalConfig(
        data=tuple(str(d) for d in data), detector=detector, perturbations=tuple(perturbations),
        normalized_check=normalized_check, limit_per_group=limit_per_group, split=split, seed=seed,
        cache_dir=None if no_cache else cache_dir, batch_size=batch_size,
    )
    show_progress = progress if progress is not None else sys.stderr.isatty()
    settings = app.offline_settings(detector_timeout_s)  # first: it configures logging before anything logs
    try:
        result = run_evaluation(config, settings, app.plugin_manager_for(detector), progress=show_progress)
    except (UnknownDetector, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    _print_result(result)
    if out is not None:
        write_report(result, out)
        click.echo(f"report: {out}")


def _row(name: str, m: BinaryMetrics) -> list[str]:
    return [name, str(m.n_fake), *(_f(v) for v in (m.accuracy, m.real_accuracy, m.fake_accuracy, m.ap, m.auc,
                                                   m.best_accuracy, m.tpr_at_fpr_5pct, m.ece, m.abstention_rate))]


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _print_result(result: EvalResult) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    raw = result.metrics[NONE]
    table = Table(title=f"{result.config.detector}: each generator vs all {raw.overall.n_real} real images")
    for column in ("generator", "fakes", "acc", "real acc", "fake acc", "AP", "AUC", "best acc", "TPR@5%FPR",
                   "ECE", "abstain"):
        table.add_column(column, justify="left" if column == "generator" else "right")
    for name, m in raw.per_generator.items():
        table.add_row(*_row(name, m))
    table.add_section()
    table.add_row(*_row("overall", raw.overall), style="bold")
    console.print(table)
    if raw.per_source:
        console.print("real sources: " + ", ".join(
            f"{s} {_f(m.real_accuracy)} (n={m.n})" for s, m in raw.per_source.items()))
    o = raw.overall
    stats = result.stats
    errors = result.errors()
    console.print(
        f"overall: n={o.n} acc={_f(o.accuracy)} AP={_f(o.ap)} AUC={_f(o.auc)} ECE={_f(o.ece)} "
        f"abstained={o.abstained} errors={len(errors)} cache_hits={stats.cache_hits} "
        f"scored={stats.scored} in {result.seconds:.1f}s"
    )
    for perturbation, grouped in result.metrics.items():
        if perturbation != NONE:
            m = grouped.overall
            console.print(f"  {perturbation:>14}: acc={_f(m.accuracy)} AP={_f(m.ap)} AUC={_f(m.auc)} "
                          f"ECE={_f(m.ece)} abstained={m.abstained}")
    if errors and raw.overall.n == 0:
        first = errors[0]
        console.print(f"[red]no image could be scored[/]; first error ({first['id']}): {first['error']}")
    gap = result.normalization_gap
    if gap is not None:
        g = gap["overall"]
        console.print(f"normalization gap (normalized - raw): acc {_f(g['accuracy'])} AUC {_f(g['auc'])} "
                      f"AP {_f(g['ap'])}")


@click.command("calibrate")
@click.option("--detector", required=True, help="The detector to calibrate.")
@_data_argument
@click.option("--split", default="val", show_default=True, help="The split to fit on.")
@click.option("--method", type=click.Choice(["temperature", "platt"]), default="temperature", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for calibration.json (default: the detector's weights directory).")
@click.option("--limit-per-group", type=click.IntRange(min=1), help="At most N images per (label, generator/source).")
@click.option("--seed", type=int, default=0, show_default=True)
@_cache_option
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: on a terminal).")
@detector_timeout_option
@pass_app
def calibrate_command(
    app: AppContext, detector: str, data: tuple[Path, ...], split: str, method: str, out: Path | None,
    limit_per_group: int | None, seed: int, cache_dir: Path, progress: bool | None, detector_timeout_s: float | None,
) -> None:
    """Fit DETECTOR's calibration on its raw logits over DATA's SPLIT and save it as calibration.json."""
    require("`streamguard calibrate`", "eval")
    from streamguard.evaluation.calibrate import Method, fit_calibration

    if detector == FUSED:
        raise click.UsageError("calibrate fits one detector; the fused score is calibrated through its detectors")
    settings = app.offline_settings(detector_timeout_s)  # first: it configures logging before anything logs
    try:
        samples = load_samples(data, seed=seed, split=split, limit_per_group=limit_per_group)
        runner = EvalRunner(settings, app.plugin_manager_for(detector), detector, cache_dir=cache_dir,
                            progress=progress if progress is not None else sys.stderr.isatty())
    except (UnknownDetector, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    spec = runner.spec
    assert spec is not None  # single-detector mode
    target = out or spec.weights_dir
    if target is None:
        runner.close()
        raise click.UsageError(f"{detector} has no weights directory; pass --out")
    if not samples:
        runner.close()
        raise click.UsageError(f"no labelled images in split {split!r}")
    with runner:
        results = runner.score(samples)
    usable = [r for r in results if r.logit is not None]
    logits = [r.logit for r in usable if r.logit is not None]
    labels = [r.sample.label for r in usable]
    fitted_on = (f"{','.join(d.name for d in data)} split={split} n={len(usable)} seed={seed} "
                 f"{detector}={spec.version}")
    try:
        calibration = fit_calibration(logits, labels, cast(Method, method), fitted_on)
    except ValueError as exc:
        raise click.UsageError(f"{exc} (split {split!r}: {len(usable)} scored, "
                               f"{sum(r.abstained for r in results)} abstained, "
                               f"{sum(r.error is not None for r in results)} errors)") from None
    target.mkdir(parents=True, exist_ok=True)
    path = calibration.save(target)
    log.info("calibrate.saved", detector=detector, path=str(path), scale=calibration.scale, bias=calibration.bias)
    _print_calibration(detector, spec.calibration, calibration, logits, labels, results, path)


def _print_calibration(
    detector: str, current: Calibration, fitted: Calibration, logits: list[float], labels: list[int],
    results: list[ScoredSample], path: Path,
) -> None:
    from streamguard.evaluation.calibrate import quality

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"{detector}: calibration on {len(logits)} images")
    for column in ("calibration", "scale", "bias", "ECE", "log-loss"):
        table.add_column(column, justify="left" if column == "calibration" else "right")
    for name, cal in (("raw (identity)", Calibration()), ("current", current), (f"fitted ({fitted.method})", fitted)):
        q = quality(logits, labels, cal)
        table.add_row(name, f"{cal.scale:.6g}", f"{cal.bias:.6g}", _f(q.ece), _f(q.log_loss))
    console.print(table)
    before, after = quality(logits, labels, current), quality(logits, labels, fitted)
    console.print(f"ECE {_f(before.ece)} -> {_f(after.ece)}; log-loss {_f(before.log_loss)} -> {_f(after.log_loss)}")
    skipped = sum(r.logit is None for r in results)
    if skipped:
        console.print(f"left out: {skipped} images (abstained or errors)")
    if fitted.scale < 0:
        console.print("[yellow]warning: negative scale: the detector is anti-correlated with the labels here[/]")
    console.print(f"saved: {path}")
