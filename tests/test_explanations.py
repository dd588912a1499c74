"""Every verdict says what drove it: each detector's weight and share of the fused logit, the thresholds and
tenant policy applied, failed detectors; and old readers' records still parse (schema_version 1)."""

from __future__ import annotations

import json
import math

import pytest

from images import encode, solid
from streamguard.config import load_settings
from streamguard.detectors.calibration import sigmoid
from streamguard.schemas import DeadLetter, ImageEvent, Verdict
from streamguard.wire import encode_event
from test_processor import Pipeline


def _event(event_id: str, image: bytes, tenant: str | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    return encode_event(ImageEvent(event_id=event_id, image=image, tenant=tenant), "binary")


def test_contributions_add_up_to_the_fused_logit_and_name_the_policy() -> None:
    # provenance abstains on a PNG without metadata: weighted, yet listed without a share.
    # A recalibrated fusion (scale and bias, as validation sets them): the bias is reported beside the shares.
    settings = load_settings(fusion={"weights": {"brightness": 2.0, "provenance": 0.5}, "scale": 1.5, "bias": -0.5},
                             policy={"ai_threshold": 0.9, "real_threshold": 0.2})
    pipeline = Pipeline(settings)
    try:
        pipeline.run(_event("e", encode(solid(200), "PNG")))
    finally:
        pipeline.close()
    ((_, verdict),) = pipeline.sink.verdicts
    explanation = verdict.explanation
    assert explanation is not None and explanation.tenant == "default" and verdict.tenant == "default"
    assert (explanation.ai_threshold, explanation.real_threshold) == (0.9, 0.2)
    assert explanation.policy_version == verdict.policy_version
    by_detector = {c.detector: c for c in explanation.contributions}
    assert set(by_detector) == {s.detector for s in verdict.scores}
    brightness = by_detector["brightness"]
    assert brightness.weight == 2.0 and brightness.logit == pytest.approx(10 * (200 / 255 - 0.5), abs=1e-3)
    assert by_detector["provenance"].logit is None and by_detector["provenance"].contribution is None
    shares = [c.contribution for c in explanation.contributions if c.contribution is not None]
    assert explanation.calibration_bias == -0.5
    assert math.isclose(sum(shares) + explanation.calibration_bias, explanation.fused_logit, rel_tol=1e-9)
    assert explanation.fused_logit == pytest.approx(1.5 * brightness.logit - 0.5)
    assert verdict.probability == pytest.approx(sigmoid(explanation.fused_logit))
    assert verdict.label == "ai_generated" and verdict.decided_by == "model" and not explanation.failed_detectors


def test_a_failed_detector_is_named_and_contributes_nothing() -> None:
    settings = load_settings(detectors={"options": {"brightness": {"fail_above": 0.9}}})
    pipeline = Pipeline(settings)
    try:
        pipeline.run(_event("bright", encode(solid(250), "PNG")))
    finally:
        pipeline.close()
    ((_, verdict),) = pipeline.sink.verdicts
    explanation = verdict.explanation
    assert explanation is not None and explanation.failed_detectors == ["brightness"]
    (brightness,) = [c for c in explanation.contributions if c.detector == "brightness"]
    assert brightness.contribution is None and brightness.logit is None


def test_a_tenant_s_weights_and_thresholds_are_the_ones_explained() -> None:
    settings = load_settings(tenants={"acme": {"ai_threshold": 0.6, "fusion_weights": {"brightness": 3.0}}})
    pipeline = Pipeline(settings)
    try:
        pipeline.run(_event("acme-1", encode(solid(170), "PNG"), tenant="acme"),
                     _event("plain-1", encode(solid(170), "PNG")))
    finally:
        pipeline.close()
    verdicts = {v.event_id: v for _, v in pipeline.sink.verdicts}
    acme, plain = verdicts["acme-1"], verdicts["plain-1"]
    assert acme.explanation.tenant == "acme" and acme.explanation.ai_threshold == 0.6  # type: ignore[union-attr]
    assert {c.detector: c.weight for c in acme.explanation.contributions}["brightness"] == 3.0  # type: ignore[union-attr]
    # p = sigmoid(10 * (170/255 - 0.5)) = 0.84: flagged at acme's 0.6, uncertain at the default 0.99.
    assert (acme.label, plain.label) == ("ai_generated", "uncertain")
    assert acme.policy_version != plain.policy_version
    assert plain.duplicate_of is None and acme.duplicate_of is None  # one scoring, two tenants: no shared ids


def test_records_without_the_new_fields_still_parse_as_schema_version_1() -> None:
    old = {"schema_version": 1, "event_id": "e", "content_sha256": "a" * 64, "label": "real", "probability": 0.1,
           "scores": [], "policy_version": "p", "model_versions": {},
           "near_duplicate_of": {"event_id": "x", "content_sha256": "b" * 64, "distance": 3}}
    verdict = Verdict.model_validate_json(json.dumps(old))
    assert verdict.decided_by == "model" and verdict.explanation is None and verdict.tenant is None
    assert verdict.matched_bank is None
    letter = DeadLetter.model_validate({"error_type": "X", "message": "m", "stage": "parse"})
    assert letter.tenant is None
