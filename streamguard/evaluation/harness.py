"""One evaluation, end to end: load samples, score them raw and under each perturbation, compute metrics.

`run_evaluation` is what ``streamguard eval`` calls and what training code can call directly. Its
`EvalResult` separates what must be identical between identical runs (`metrics_document`) from what may
not be (`run_document`: timings, cache hits, the date).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pluggy
import structlog

from streamguard.config import Settings
from streamguard.evaluation.datasets import LoadSummary, Sample, load_samples
from streamguard.evaluation.metrics import ABSTAIN_SCORE, GroupedMetrics, gap, grouped_metrics
from streamguard.evaluation.perturb import NONE, NORMALIZED, PERTURB_VERSION
from streamguard.evaluation.runner import DEFAULT_CACHE_DIR, EvalRunner, RunStats, ScoredSample

log = structlog.get_logger(__name__)

SCHEMA = "streamguard-eval/1"
ABSTENTION_RULE = (
    f"an abstention (no score, no error) is scored {ABSTAIN_SCORE}: a 'real' call at threshold 0.5 and a tie "
    "in AUC/AP; counted in 'abstained' and 'abstention_rate'. Errors are left out of every metric."
)


@dataclass(frozen=True)
class EvalConfig:
    data: tuple[str, ...]
    detector: str
    perturbations: tuple[str, ...] = ()  # robustness sweep; the raw images ("none") are always scored
    normalized_check: bool = True
    limit_per_group: int | None = None
    split: str | None = None
    seed: int = 0
    cache_dir: Path | None = DEFAULT_CACHE_DIR
    batch_size: int | None = None

    @property
    def runs(self) -> list[str]:
        return [NONE, *self.perturbations, *([NORMALIZED] if self.normalized_check else [])]


@dataclass
class EvalResult:
    config: EvalConfig
    samples: list[Sample]
    scored: dict[str, list[ScoredSample]]  # perturbation -> one result per sample, in sample order
    metrics: dict[str, GroupedMetrics]
    versions: dict[str, str]
    calibrations: dict[str, dict[str, object]]
    summary: LoadSummary
    stats: RunStats
    seconds: float
    finished_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def normalization_gap(self) -> dict[str, Any] | None:
        """Normalized minus raw, overall and per generator: what the format/resolution shortcut was worth."""
        if NORMALIZED not in self.metrics:
            return None
        raw, norm = self.metrics[NONE], self.metrics[NORMALIZED]
        return {
            "overall": gap(raw.overall, norm.overall),
            "per_generator": {
                g: gap(m, norm.per_generator[g]) for g, m in raw.per_generator.items() if g in norm.per_generator
            },
        }

    def errors(self) -> list[dict[str, str]]:
        return [
            {"id": r.sample.id, "perturbation": r.perturbation, "error": r.error}
            for results in self.scored.values() for r in results if r.error is not None
        ]

    def metrics_document(self) -> dict[str, Any]:
        """Everything measured; identical inputs give an identical document (no timestamps, no timings)."""
        errors = self.errors()
        c = self.config
        return {
            "schema": SCHEMA,
            "detector": c.detector,
            "versions": self.versions,
            "calibrations": self.calibrations,
            "seed": c.seed,
            "data": list(c.data),
            "split": c.split,
            "limit_per_group": c.limit_per_group,
            "perturbations": c.runs,
            "perturbation_version": PERTURB_VERSION,
            "abstention": ABSTENTION_RULE,
            "counts": _counts(self.samples, self.summary),
            "errors": {
                "count": len(errors),
                "by_type": dict(sorted(Counter(e["error"].split(":", 1)[0] for e in errors).items())),
                "by_perturbation": {p: sum(r.error is not None for r in rs) for p, rs in self.scored.items()},
                "items": errors,
            },
            "results": {p: m.as_dict() for p, m in self.metrics.items()},
            "normalization_gap": self.normalization_gap,
        }

    def run_document(self) -> dict[str, Any]:
        """How this run went: may differ between identical runs."""
        return {
            "finished_at": self.finished_at,
            "seconds": round(self.seconds, 3),
            "samples": len(self.samples),
            "scored": self.stats.scored,
            "cache_hits": self.stats.cache_hits,
            "errors": self.stats.errors,
            "abstained": self.stats.abstained,
            "cache_dir": None if self.config.cache_dir is None else str(self.config.cache_dir),
        }


def _counts(samples: Sequence[Sample], summary: LoadSummary) -> dict[str, Any]:
    def tally(values: Sequence[str]) -> dict[str, int]:
        return dict(sorted(Counter(values).items()))

    return {
        "samples": len(samples),
        "real": sum(s.label == 0 for s in samples),
        "fake": sum(s.label == 1 for s in samples),
        "by_generator": tally([s.generator for s in samples if s.label == 1]),
        "by_source": tally([s.source for s in samples if s.label == 0]),
        "by_family": tally([s.family for s in samples]),
        "by_split": tally([s.split for s in samples]),
        "read_before_filtering": {root: dict(sorted(c.items())) for root, c in summary.roots.items()},
        "skipped": dict(sorted(summary.skipped.items())),
    }


def metrics_for(results: Sequence[ScoredSample]) -> GroupedMetrics:
    ok = [r for r in results if r.error is None]
    return grouped_metrics(
        [r.sample.label for r in ok], [r.sample.generator for r in ok], [r.sample.source for r in ok],
        [r.score for r in ok],
    )


def run_evaluation(
    config: EvalConfig, settings: Settings, pm: pluggy.PluginManager, *, progress: bool = False,
    samples: Sequence[Sample] | None = None,
) -> EvalResult:
    """Score ``config.data`` (or the ``samples`` given) raw and under each perturbation; compute metrics.

    Raises ValueError for data that is not data or holds no labelled image, and UnknownDetector.
    """
    t0 = time.perf_counter()
    summary = LoadSummary()
    if samples is None:
        samples = load_samples(config.data, seed=config.seed, split=config.split,
                               limit_per_group=config.limit_per_group, summary=summary)
    if not samples:
        raise ValueError("no labelled images found" + (f" in split {config.split!r}" if config.split else ""))
    scored: dict[str, list[ScoredSample]] = {}
    with EvalRunner(settings, pm, config.detector, cache_dir=config.cache_dir, batch_size=config.batch_size,
                    progress=progress) as runner:
        for perturbation in config.runs:
            scored[perturbation] = runner.score(samples, perturbation)
        versions, calibrations, stats = runner.versions, runner.calibrations, runner.stats
    metrics = {p: metrics_for(results) for p, results in scored.items()}
    result = EvalResult(config, list(samples), scored, metrics, versions, calibrations, summary, stats,
                        time.perf_counter() - t0)
    log.info("eval.finished", detector=config.detector, samples=len(samples), cache_hits=stats.cache_hits,
             errors=stats.errors, seconds=round(result.seconds, 3))
    return result
