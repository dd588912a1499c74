"""Default fusion (a built-in plugin): weighted mean of the detectors' calibrated logits.

Averaging logits rather than probabilities lets a confident detector count for more than a hesitant one,
and calibration makes the logits comparable. Failed and abstaining detectors are left out, so the fused
score stays defined while any detector answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streamguard.config import FusionSettings
from streamguard.detectors.calibration import sigmoid
from streamguard.hookspecs import hookimpl
from streamguard.schemas import DetectorScore


@dataclass(frozen=True)
class FusedScore:
    """``probability``/``logit`` are None when no detector contributed."""

    probability: float | None
    logit: float | None
    contributors: tuple[str, ...] = ()
    method: str = "weighted-logit-mean"


@hookimpl(trylast=True)
def fuse_scores(scores: Sequence[DetectorScore], settings: FusionSettings) -> FusedScore:
    total = weighted = 0.0
    used: list[str] = []
    for score in scores:
        if not score.ok or score.logit is None:
            continue
        weight = settings.weights.get(score.detector, settings.default_weight)
        if weight <= 0:
            continue
        weighted += weight * score.logit
        total += weight
        used.append(score.detector)
    if total == 0:
        return FusedScore(probability=None, logit=None)
    logit = weighted / total
    return FusedScore(probability=sigmoid(logit), logit=logit, contributors=tuple(used))
