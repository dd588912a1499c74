"""A tenant's verdict from detector scores: fusion and policy under the tenant's settings, and why.

The scorer judges content once with the global settings; what a tenant is told is decided here, from the
same scores, so copies of one image for two tenants run the detectors once and still get each tenant's
thresholds. Cached verdicts go through here again for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from streamguard.config import FusionSettings, PolicySettings
from streamguard.fusion import FusedScore
from streamguard.policy import Decision
from streamguard.schemas import DetectorContribution, DetectorScore, Evidence, Explanation, MatchedBank, Verdict
from streamguard.tenants import Tenant


@dataclass(frozen=True)
class Judgement:
    """What fusion and policy made of a verdict's scores, and under which settings (`Scorer.judge`)."""

    fusion: FusionSettings
    policy: PolicySettings
    fused: FusedScore
    decision: Decision


class Decider:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    def decide(self, verdict: Verdict, tenant: Tenant, evidence: Sequence[Evidence] = (), *,
               judged: Judgement | None = None, changes: Mapping[str, Any] | None = None) -> Verdict:
        """``verdict`` re-decided from its scores for ``tenant``, with its explanation, and ``changes`` made
        in the same copy. Verdicts a bank or a person decided keep their label: no threshold applies to them.
        ``judged``: the scorer's own judgement of these scores, taken as it is when the tenant's settings are
        the very ones it was made under (the default tenant), instead of fusing and deciding again."""
        if verdict.decided_by != "model":
            return verdict.model_copy(update={**(changes or {}), "tenant": tenant.name})
        scores = verdict.scores
        if judged is not None and judged.fusion is tenant.fusion and judged.policy is tenant.policy:
            fused, decision = judged.fused, judged.decision
        else:
            fused = self._pm.hook.fuse_scores(scores=scores, settings=tenant.fusion)
            decision = self._pm.hook.decide_verdict(fused=fused, scores=scores, settings=tenant.policy)
        failed = sorted({score.detector for score in scores if score.error is not None})
        explanation = Explanation(
            tenant=tenant.name,
            policy_version=decision.policy_version,
            ai_threshold=tenant.policy.ai_threshold,
            real_threshold=tenant.policy.real_threshold,
            fusion_method=fused.method,
            fused_logit=fused.logit,
            calibration_bias=fused.bias,
            contributions=contributions(scores, fused),
            failed_detectors=failed,
            evidence=[*evidence, *credential_evidence(scores)],
        )
        return verdict.model_copy(update={
            **(changes or {}),
            "label": decision.label,
            "probability": fused.probability,
            "policy_version": decision.policy_version,
            "tenant": tenant.name,
            "explanation": explanation,
        })


def credential_evidence(scores: Sequence[DetectorScore]) -> list[Evidence]:
    """A trusted content credential that counted, named as evidence beside its share of the fused logit:
    a reviewer reads "the signer says it was generated", not only "a detector said +15"."""
    from streamguard.builtin.credentials.plugin import GENERATED_LOGIT, NAME

    return [Evidence(kind="credential", name="c2pa",
                     detail={"declared": "generated" if score.logit >= GENERATED_LOGIT else "captured",
                             "logit": score.logit, "version": score.version})
            for score in scores if score.detector == NAME and score.ok and score.logit is not None]


def contributions(scores: Sequence[DetectorScore], fused: FusedScore) -> list[DetectorContribution]:
    """Each detector's ``scale * weight * logit / total``: with the fusion's calibration bias they add up to
    the fused logit. A fusion that reports no weights gets the weights and logits alone."""
    total = sum(fused.weights.values())
    out = []
    for score in scores:
        weight = fused.weights.get(score.detector, 0.0)
        share = None
        if score.ok and score.logit is not None and total > 0:
            share = fused.scale * weight * score.logit / total
        out.append(DetectorContribution(detector=score.detector, weight=weight, logit=score.logit, contribution=share))
    return out


def bank_verdict(event_id: str, sha256: str, tenant: Tenant, label: str, bank: MatchedBank,
                 policy_version: str, timings_ms: dict[str, float]) -> Verdict:
    """The verdict of content found in a hash bank: the bank's label, no detector scores."""
    evidence = Evidence(kind="bank", name=bank.bank, detail={"match": bank.kind, "distance": bank.distance,
                                                             "label": label})
    return Verdict(
        event_id=event_id,
        content_sha256=sha256,
        label=label,  # type: ignore[arg-type]
        probability=None,
        scores=[],
        policy_version=policy_version,
        model_versions={},
        timings_ms=timings_ms,
        tenant=tenant.name,
        matched_bank=bank,
        decided_by="bank",
        explanation=Explanation(tenant=tenant.name, policy_version=policy_version,
                                ai_threshold=tenant.policy.ai_threshold, real_threshold=tenant.policy.real_threshold,
                                evidence=[evidence]),
    )
