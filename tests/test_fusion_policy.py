from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from streamguard.config import FusionSettings, PolicySettings
from streamguard.fusion import FusedScore, fuse_scores
from streamguard.policy import decide_verdict, policy_version
from streamguard.schemas import DetectorScore


def _s(name: str, logit: float | None, error: str | None = None) -> DetectorScore:
    p = None if logit is None else 1 / (1 + math.exp(-logit))
    return DetectorScore(detector=name, version="1", logit=logit, probability=p, latency_ms=1.0, error=error)


def test_weighted_mean_of_logits() -> None:
    fused = fuse_scores([_s("a", 2.0), _s("b", -1.0)], FusionSettings(weights={"a": 3.0, "b": 1.0}, scale=1.0, bias=0.0))
    assert fused.logit == pytest.approx((3 * 2.0 - 1.0) / 4)
    assert fused.probability == pytest.approx(1 / (1 + math.exp(-1.25)))
    assert fused.contributors == ("a", "b")


def test_the_fused_logit_is_recalibrated_as_validated() -> None:
    # The shipped defaults: the held-out pool's Platt scaling of the weighted mean (docs/validation.md).
    shipped = FusionSettings(weights={"a": 3.0, "b": 1.0})
    fused = fuse_scores([_s("a", 2.0), _s("b", -1.0)], shipped)
    assert 0 < shipped.scale < 1  # unseen sources made the folds' own calibrations overconfident
    assert fused.logit == pytest.approx(shipped.scale * 1.25 + shipped.bias)
    assert fused.probability == pytest.approx(1 / (1 + math.exp(-fused.logit)))


def test_failed_abstaining_and_zero_weight_detectors_are_left_out() -> None:
    scores = [_s("a", 1.0), _s("broken", None, "timed out"), _s("quiet", None), _s("off", 9.0)]
    fused = fuse_scores(scores, FusionSettings(weights={"off": 0.0}, scale=1.0, bias=0.0))
    assert fused.logit == pytest.approx(1.0) and fused.contributors == ("a",)


def test_nothing_to_fuse_gives_no_probability() -> None:
    fused = fuse_scores([_s("broken", None, "boom")], FusionSettings())
    assert fused.probability is None and fused.logit is None


@given(st.lists(st.tuples(st.floats(-20, 20), st.floats(0.01, 10)), min_size=1, max_size=6))
def test_fused_logit_lies_between_the_inputs(pairs: list[tuple[float, float]]) -> None:
    scores = [_s(f"d{i}", logit) for i, (logit, _) in enumerate(pairs)]
    weights = {f"d{i}": w for i, (_, w) in enumerate(pairs)}
    fused = fuse_scores(scores, FusionSettings(weights=weights, scale=1.0, bias=0.0))
    logits = [logit for logit, _ in pairs]
    assert fused.logit is not None
    assert min(logits) - 1e-9 <= fused.logit <= max(logits) + 1e-9


@pytest.mark.parametrize(
    ("p", "label"),
    [(0.95, "ai_generated"), (0.8, "ai_generated"), (0.5, "uncertain"), (0.2, "real"), (0.01, "real"),
     (None, "uncertain")],
)
def test_policy_thresholds(p: float | None, label: str) -> None:
    decision = decide_verdict(FusedScore(probability=p, logit=None), PolicySettings(ai_threshold=0.8,
                                                                                     real_threshold=0.2))
    assert decision.label == label


def test_policy_version_changes_with_thresholds() -> None:
    assert policy_version(PolicySettings(ai_threshold=0.8)) != policy_version(PolicySettings(ai_threshold=0.9))


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match="real_threshold"):
        PolicySettings(ai_threshold=0.3, real_threshold=0.5)
