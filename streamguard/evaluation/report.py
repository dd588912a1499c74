"""Write an `EvalResult` to a directory: metrics.json, run.json, scores.csv, report.md and its plots.

``metrics.json`` is byte-identical between identical runs; what varies (timings, cache hits, the date)
goes to ``run.json``. Plots are drawn on matplotlib's Agg canvas directly, without pyplot's global state.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from streamguard.evaluation.harness import EvalResult
from streamguard.evaluation.metrics import BinaryMetrics, roc_points
from streamguard.evaluation.perturb import NONE, NORMALIZED
from streamguard.evaluation.runner import ScoredSample

log = structlog.get_logger(__name__)

SCORE_COLUMNS = ("id", "path", "member", "label", "generator", "family", "source", "split", "perturbation",
                 "score", "error")
_TABLE_KEYS = ("n_real", "n_fake", "accuracy", "real_accuracy", "fake_accuracy", "ap", "auc", "best_accuracy",
               "tpr_at_fpr_5pct", "ece", "abstention_rate")
_ERRORS_SHOWN = 20


def write_report(result: EvalResult, out: Path) -> list[Path]:
    """Write every artefact into ``out`` (created); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _write_json(out / "metrics.json", result.metrics_document()),
        _write_json(out / "run.json", result.run_document()),
        _write_scores(out / "scores.csv", result),
    ]
    plots = {
        "roc": _plot_roc(out / "roc.png", result.scored[NONE]),
        "generators": _plot_generators(out / "generators.png", result),
    }
    sweep = [p for p in result.scored if p != NORMALIZED]
    if len(sweep) > 1:
        plots["perturbations"] = _plot_sweep(out / "perturbations.png", result, sweep)
    written.extend(plots.values())
    written.append(_write_markdown(out / "report.md", result, plots))
    log.info("eval.report_written", out=str(out), files=[p.name for p in written])
    return written


def _write_json(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def _write_scores(path: Path, result: EvalResult) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SCORE_COLUMNS)
        for perturbation, results in result.scored.items():
            for r in results:
                s = r.sample
                writer.writerow([s.id, s.path, s.member or "", s.label, s.generator, s.family, s.source, s.split,
                                 perturbation, "" if r.score is None else repr(r.score), r.error or ""])
    return path


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    return path


def _plot_roc(path: Path, results: Sequence[ScoredSample]) -> Path:
    ok = [r for r in results if r.error is None]
    fig = Figure(figsize=(6, 5.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.8", lw=1, ls="--")
    reals = [r for r in ok if r.sample.label == 0]
    for generator in sorted({r.sample.generator for r in ok if r.sample.label == 1}):
        group = reals + [r for r in ok if r.sample.generator == generator]
        curve = roc_points([r.sample.label for r in group], [r.score for r in group])
        if curve is not None:
            ax.plot(*curve, lw=1, alpha=0.8, label=generator)
    overall = roc_points([r.sample.label for r in ok], [r.score for r in ok])
    if overall is not None:
        ax.plot(*overall, color="black", lw=2.5, label="overall")
    ax.set(xlabel="false positive rate (real called fake)", ylabel="true positive rate (fake caught)",
           title="ROC, raw images: each generator vs all real", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _plot_generators(path: Path, result: EvalResult) -> Path:
    per = result.metrics[NONE].per_generator
    names = list(per)
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6, 0.8 * len(names) + 2), 4.5))
    ax = fig.add_subplot()
    series = [("accuracy", "accuracy @0.5"), ("auc", "ROC-AUC")]
    if NORMALIZED in result.metrics:
        series.append(("normalized_auc", "ROC-AUC, normalized"))
    width = 0.8 / len(series)
    for k, (key, label) in enumerate(series):
        if key == "normalized_auc":
            values = [_value(result.metrics[NORMALIZED].per_generator.get(n), "auc") for n in names]
        else:
            values = [_value(per[n], key) for n in names]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="score", title="Per generator (fakes vs all real); missing bar = undefined")
    ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _value(metrics: BinaryMetrics | None, key: str) -> float:
    value = None if metrics is None else getattr(metrics, key)
    return float("nan") if value is None else value


def _plot_sweep(path: Path, result: EvalResult, names: Sequence[str]) -> Path:
    fig = Figure(figsize=(max(6, 0.7 * len(names) + 2), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(names))
    for key, label in (("auc", "ROC-AUC"), ("ap", "AP"), ("accuracy", "accuracy @0.5"), ("best_accuracy", "best acc")):
        ax.plot(x, [_value(result.metrics[n].overall, key) for n in names], marker="o", label=label)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="overall", title="Robustness sweep (real and fake perturbed alike)")
    ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _metric_rows(named: dict[str, BinaryMetrics]) -> list[list[object]]:
    return [[name, *(getattr(m, k) for k in _TABLE_KEYS)] for name, m in named.items()]


def _write_markdown(path: Path, result: EvalResult, plots: dict[str, Path]) -> Path:
    doc = result.metrics_document()
    raw = result.metrics[NONE]
    counts = doc["counts"]
    lines = [
        f"# Evaluation: `{result.config.detector}`",
        "",
        f"- Data: {', '.join(f'`{d}`' for d in result.config.data)}; split: {result.config.split or 'all'}; "
        f"limit per group: {result.config.limit_per_group or 'none'}; seed {result.config.seed}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in result.versions.items())}",
        f"- Samples: {counts['samples']} ({counts['real']} real, {counts['fake']} fake); errors: "
        f"{doc['errors']['count']}; abstained (raw): {raw.overall.abstained}",
        f"- Abstentions: {doc['abstention']}",
        "",
        "## Overall (raw images)",
        "",
        *_table(["group", *_TABLE_KEYS], _metric_rows({"overall": raw.overall})),
        "Mean over generators: " + ", ".join(f"{k} {_fmt(v)}" for k, v in raw.mean_over_generators.items()),
        "",
        "## Per generator (its fakes vs all real images)",
        "",
        *_table(["generator", *_TABLE_KEYS], _metric_rows(raw.per_generator)),
        "## Per real source",
        "",
        *_table(["source", "n", "real_accuracy", "mean_score", "abstained"],
                [[s, m.n, m.real_accuracy, m.mean_score, m.abstained] for s, m in raw.per_source.items()]),
        f"![ROC]({plots['roc'].name})",
        "",
        f"![Per generator]({plots['generators'].name})",
        "",
    ]
    if len(result.metrics) > 1:
        base = raw.overall
        rows = [[p, m.overall.n, m.overall.accuracy, m.overall.ap, m.overall.auc, m.overall.ece,
                 None if m.overall.auc is None or base.auc is None else m.overall.auc - base.auc]
                for p, m in result.metrics.items()]
        lines += ["## Perturbations (overall)", "",
                  *_table(["perturbation", "n", "accuracy", "ap", "auc", "ece", "Δauc vs raw"], rows)]
        if "perturbations" in plots:
            lines += [f"![Perturbation sweep]({plots['perturbations'].name})", ""]
    gap = result.normalization_gap
    if gap is not None:
        lines += [
            "## Format/resolution shortcut check",
            "",
            "Every image re-encoded as JPEG q=90, shortest side 256, centre crop 256. Gap = normalized − raw; "
            "a large drop means the detector leaned on format or size.",
            "",
            *_table(["group", *gap["overall"]],
                    [["overall", *gap["overall"].values()]]
                    + [[g, *v.values()] for g, v in gap["per_generator"].items()]),
        ]
    errors = doc["errors"]
    if errors["count"]:
        lines += ["## Errors", "", f"{errors['count']} sample results could not be scored: "
                  + ", ".join(f"{k} {v}" for k, v in errors["by_type"].items()), ""]
        lines += [f"- `{e['id']}` ({e['perturbation']}): {e['error']}" for e in errors["items"][:_ERRORS_SHOWN]]
        if errors["count"] > _ERRORS_SHOWN:
            lines.append(f"- … {errors['count'] - _ERRORS_SHOWN} more in metrics.json")
        lines.append("")
    path.write_text("\n".join(lines))
    return path
