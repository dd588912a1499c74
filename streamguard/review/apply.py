"""Applying one reviewer's decision: remember it, bank the content, and say it on the verdict topic.

Order matters for at-least-once: the cache and the bank are written before the verdict is published, and
the decision is committed only after the broker acknowledged that verdict (`consumer`). A decision seen
twice writes the same cache entry and bank entry again (adding banked content is a no-op) and publishes
the same verdict again; nothing is lost when the process dies between any two steps.

The later decision wins: the content is added to the decided bank and then withdrawn from the other review
bank, where an earlier, reversed decision may have put it (banks are append-only; a withdrawal masks it).
Adding first, then withdrawing: a crash between the two leaves the content banked (in both banks, the old
label answering only where the tenant lists the old bank first) until the decision, not committed, is
applied again and withdraws it; withdrawing first would leave it in no bank at all meanwhile. Adding to a
bank also restores content withdrawn from it, so a decision reversed twice ends in its latest state.
"""

from __future__ import annotations

import structlog

from streamguard.banks import BankStore
from streamguard.config import Settings
from streamguard.dedupe.phash import from_hex
from streamguard.dedupe.store import DedupeStore, versions_key
from streamguard.policy import policy_version
from streamguard.schemas import Evidence, Explanation, ReviewDecision, Verdict
from streamguard.tenants import Tenants

log = structlog.get_logger(__name__)


class DecisionApplier:
    """``model_versions`` and ``scorer_policy_version``: the worker's, so the verdict lands under the key the
    worker's cache lookups use (`Scorer.model_versions`, `Scorer.policy_version`)."""

    def __init__(self, settings: Settings, dedupe: DedupeStore, banks: BankStore, model_versions: dict[str, str],
                 scorer_policy_version: str) -> None:
        self._settings = settings
        self._tenants = Tenants(settings)
        self._dedupe = dedupe
        self._banks = banks
        self._versions_key = versions_key(model_versions, scorer_policy_version)
        review = settings.review
        banks.ensure_banks({review.bank_ai: "ai_generated", review.bank_real: "real"})

    def apply(self, decision: ReviewDecision) -> Verdict:
        """Cache and bank the decision; returns the verdict to publish. Raises when the bank cannot be
        written (the decision is then not committed, and is applied again)."""
        review = self._settings.review
        tenant = self._tenants.resolve(decision.tenant)
        bank, other = ((review.bank_ai, review.bank_real) if decision.label == "ai_generated"
                       else (review.bank_real, review.bank_ai))
        phash = from_hex(decision.pdq, decision.pdq_quality or 0) if decision.pdq is not None else None
        version = policy_version(tenant.policy)
        verdict = Verdict(
            event_id=decision.event_id,
            content_sha256=decision.content_sha256,
            label=decision.label,
            probability=None,
            scores=[],
            policy_version=version,
            model_versions={},
            tenant=tenant.name,
            decided_by="review",
            explanation=Explanation(
                tenant=tenant.name, policy_version=version, ai_threshold=tenant.policy.ai_threshold,
                real_threshold=tenant.policy.real_threshold,
                evidence=[Evidence(kind="review", name=decision.reviewer,
                                   detail={"note": decision.note, "bank": bank,
                                           "decided_at": decision.decided_at.isoformat()})],
            ),
        )
        # The cache answers this tenant's later copies even where the bank is not subscribed.
        self._dedupe.put(decision.content_sha256, tenant.dedupe_key(self._versions_key), verdict, phash)
        note = f"review by {decision.reviewer}" + (f": {decision.note}" if decision.note else "")
        # The image's URI stays with the entry: without it a bank cannot be audited against the models.
        self._banks.add(bank, decision.label, decision.content_sha256, phash, note=note[:1000],
                        source=decision.image_uri)
        # After the add, never before (module docstring): an earlier, reversed decision stops answering.
        # Only content the other bank holds (by SHA-256) is withdrawn: a first decision leaves no trace there.
        withdrawn = self._banks.withdraw(other, decision.content_sha256, phash, if_banked=True)
        log.info("review.applied", event_id=decision.event_id, tenant=tenant.name, label=decision.label, bank=bank,
                 withdrawn_from=other if withdrawn else None)
        return verdict
