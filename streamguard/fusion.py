"""Default fusion (a built-in plugin): weighted mean of the detectors' calibrated logits.

Averaging logits rather than probabilities lets a confident detector count for more than a hesitant one,
and calibration makes the logits comparable. Failed and abstaining detectors are left out, so the fused
score stays defined while any detector answered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from streamguard.config import FusionSettings
from streamguard.detectors.calibration import sigmoid
from streamguard.hookspecs import hookimpl
from streamguard.schemas import DetectorScore


@dataclass(frozen=True)
class FusedScore:
    """``probability``/``logit`` are None when no detector contributed. ``weights``: the weight each
    contributor's logit had (a fusion that is not a weighted mean leaves it empty), which is what lets a
    verdict explain itself."""

    probability: float | None
    logit: float | None
    contributors: tuple[str, ...] = ()
    method: str = "weighted-logit-mean"
    weights: Mapping[str, float] = field(default_factory=dict)
    scale: float = 1.0  # the fused logit is scale * (weighted mean) + bias
    bias: float = 0.0


@hookimpl(trylast=True)
def fuse_scores(scores: Sequence[DetectorScore], settings: FusionSettings) -> FusedScore:
    total = weighted = 0.0
    used: dict[str, float] = {}
    for score in scores:
        if not score.ok or score.logit is None:
            continue
        weight = settings.weights.get(score.detector, settings.default_weight)
        if weight <= 0:
            continue
        weighted += weight * score.logit
        total += weight
        used[score.detector] = weight
    if total == 0:
        return FusedScore(probability=None, logit=None)
    # The weighted mean, recalibrated as a whole (fusion.scale/bias, fitted on held-out sources: see
    # docs/validation.md); identity unless validation set it.
    logit = settings.scale * (weighted / total) + settings.bias
    return FusedScore(probability=sigmoid(logit), logit=logit, contributors=tuple(used), weights=used,
                      scale=settings.scale, bias=settings.bias)
