"""The field's detector metrics, on probability-of-fake scores, per group and overall.

Conventions (those of CNNDetection and its successors):
- "fake" is the positive class; a sample is called fake when its score is strictly above 0.5, so a score
  of exactly 0.5 (an abstention, see `ABSTAIN_SCORE`) counts as a "real" call.
- Per generator: that generator's fakes against ALL real images. Per real source: real accuracy only.
- ECE is the reliability of the fake probability itself: 15 equal-width bins over [0, 1], each bin's
  |fraction fake - mean score| weighted by its share of samples.
- A group with one class only has no AUC, AP, best threshold or TPR@FPR: those are None, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_curve

THRESHOLD = 0.5
ECE_BINS = 15
ABSTAIN_SCORE = 0.5  # an abstaining detector says "no evidence": scored as a coin flip, counted apart
FPR_TARGETS = (0.01, 0.05)
_DIGITS = 6


def ranked_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ROC-AUC as the weighted share of (fake, real) pairs the scores rank fake first, ties counting half:
    the area sklearn's ``roc_auc_score`` gives, for labels of both classes.

    Why not sklearn's: scikit-learn 1.9 checks its inputs for dataframes (narwhals) on every call, ~2 ms on a
    hundred images, and a bootstrap scores a thousand resamples a detector: on the tests' small `train loso`
    and `loso-variants` runs those checks were nine tenths of the time."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=float)
    order = np.argsort(scores, kind="stable")
    ranked, fake = scores[order], labels[order] == 1
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # one block per distinct score
    w = weights[order]
    fakes, reals = np.add.reduceat(np.where(fake, w, 0.0), starts), np.add.reduceat(np.where(fake, 0.0, w), starts)
    below = np.cumsum(reals) - reals  # real weight under each block's score
    return float(np.sum(fakes * (below + reals / 2)) / (fakes.sum() * reals.sum()))


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), _DIGITS)


@dataclass(frozen=True)
class BinaryMetrics:
    n: int
    n_real: int
    n_fake: int
    abstained: int
    abstention_rate: float | None
    accuracy: float | None
    real_accuracy: float | None
    fake_accuracy: float | None
    ap: float | None
    auc: float | None
    best_accuracy: float | None
    best_threshold: float | None
    tpr_at_fpr_1pct: float | None
    tpr_at_fpr_5pct: float | None
    ece: float | None
    log_loss: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SourceMetrics:
    """A real-image source: how often its images are called real."""

    n: int
    abstained: int
    real_accuracy: float | None
    mean_score: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GroupedMetrics:
    overall: BinaryMetrics
    per_generator: dict[str, BinaryMetrics]
    per_source: dict[str, SourceMetrics]
    mean_over_generators: dict[str, float | None]

    def as_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.as_dict(),
            "mean_over_generators": self.mean_over_generators,
            "per_generator": {k: v.as_dict() for k, v in self.per_generator.items()},
            "per_source": {k: v.as_dict() for k, v in self.per_source.items()},
        }


def filled(scores: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """Scores as an array with abstentions (None) at `ABSTAIN_SCORE`, and the mask of abstentions."""
    missing = np.array([s is None for s in scores], dtype=bool)
    values = np.array([ABSTAIN_SCORE if s is None else s for s in scores], dtype=np.float64)
    return values, missing


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> float | None:
    if len(labels) == 0:
        return None
    index = np.minimum((scores * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.mean() * abs(labels[mask].mean() - scores[mask].mean())
    return float(total)


def log_loss(labels: np.ndarray, scores: np.ndarray, eps: float = 1e-15) -> float | None:
    if len(labels) == 0:
        return None
    p = np.clip(scores, eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float | None]:
    """The highest accuracy any threshold reaches (calling fake at score >= threshold), and that threshold.

    The threshold is None when the best choice is to call every image real.
    """
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    positives, negatives = labels.sum(), len(labels) - labels.sum()
    accuracy = (tpr * positives + (1 - fpr) * negatives) / len(labels)
    best = int(np.argmax(accuracy))  # first maximum = highest threshold among ties
    threshold = float(thresholds[best])
    return float(accuracy[best]), threshold if math.isfinite(threshold) else None


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest TPR among operating points whose FPR does not exceed ``target``."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= target + 1e-12].max())


def binary_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float | None]) -> BinaryMetrics:
    y = np.asarray(labels, dtype=np.int64)
    p, missing = filled(scores)
    n, n_fake = len(y), int(y.sum())
    n_real = n - n_fake
    called_fake = p > THRESHOLD
    both = n_real > 0 and n_fake > 0
    best_acc, best_thr = best_threshold(y, p) if both else (None, None)
    tprs = [tpr_at_fpr(y, p, target) if both else None for target in FPR_TARGETS]
    return BinaryMetrics(
        n=n,
        n_real=n_real,
        n_fake=n_fake,
        abstained=int(missing.sum()),
        abstention_rate=_round(missing.mean()) if n else None,
        accuracy=_round((called_fake == y).mean()) if n else None,
        real_accuracy=_round((~called_fake[y == 0]).mean()) if n_real else None,
        fake_accuracy=_round(called_fake[y == 1].mean()) if n_fake else None,
        ap=_round(average_precision_score(y, p)) if both else None,
        auc=_round(ranked_auc(y, p)) if both else None,
        best_accuracy=_round(best_acc),
        best_threshold=_round(best_thr),
        tpr_at_fpr_1pct=_round(tprs[0]),
        tpr_at_fpr_5pct=_round(tprs[1]),
        ece=_round(expected_calibration_error(y, p)),
        log_loss=_round(log_loss(y, p)),
    )


def source_metrics(scores: Sequence[float | None]) -> SourceMetrics:
    p, missing = filled(scores)
    n = len(p)
    return SourceMetrics(
        n=n,
        abstained=int(missing.sum()),
        real_accuracy=_round((p <= THRESHOLD).mean()) if n else None,
        mean_score=_round(p.mean()) if n else None,
    )


_AVERAGED = ("accuracy", "fake_accuracy", "ap", "auc", "best_accuracy", "tpr_at_fpr_5pct", "ece")


def grouped_metrics(
    labels: Sequence[int], generators: Sequence[str], sources: Sequence[str], scores: Sequence[float | None]
) -> GroupedMetrics:
    """Overall, per generator (its fakes + every real), per real source, and the mean over generators."""
    y = np.asarray(labels, dtype=np.int64)
    real_idx = [i for i, label in enumerate(labels) if label == 0]
    per_generator: dict[str, BinaryMetrics] = {}
    for generator in sorted({g for g, label in zip(generators, labels, strict=True) if label == 1}):
        idx = real_idx + [i for i, g in enumerate(generators) if g == generator and labels[i] == 1]
        per_generator[generator] = binary_metrics(y[idx], [scores[i] for i in idx])
    per_source = {
        source: source_metrics([scores[i] for i in real_idx if sources[i] == source])
        for source in sorted({sources[i] for i in real_idx})
    }
    means: dict[str, float | None] = {}
    for key in _AVERAGED:
        values = [getattr(m, key) for m in per_generator.values() if getattr(m, key) is not None]
        means[key] = _round(float(np.mean(values))) if values else None
    return GroupedMetrics(binary_metrics(y, scores), per_generator, per_source, means)


def roc_points(labels: Sequence[int], scores: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) for plotting; None for a group with one class only."""
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0 or y.min() == y.max():
        return None
    p, _ = filled(scores)
    fpr, tpr, _ = roc_curve(y, p)
    return fpr, tpr


def gap(raw: BinaryMetrics, other: BinaryMetrics) -> dict[str, float | None]:
    """``other - raw`` per metric: how much a normalization or perturbation moves each number."""
    out: dict[str, float | None] = {}
    for key in ("accuracy", "real_accuracy", "fake_accuracy", "ap", "auc", "best_accuracy", "tpr_at_fpr_5pct", "ece"):
        a, b = getattr(raw, key), getattr(other, key)
        out[key] = None if a is None or b is None else _round(b - a)
    return out
