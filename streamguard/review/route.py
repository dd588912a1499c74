"""Which verdicts need a person, and the review request that carries what they need to decide.

The request names the image without copying it: a URI event's URI, otherwise the original record's topic,
partition and offset (the input topic keeps it). It carries the PDQ hash, so that the decision can add
the content to a bank, near-duplicates included, without fetching the image again.
"""

from __future__ import annotations

from typing import Literal

from streamguard.config import ReviewSettings
from streamguard.dedupe.phash import PerceptualHash, to_hex
from streamguard.schemas import Evidence, ImageEvent, ReviewRequest, Verdict
from streamguard.worker.records import InRecord

BANK_DISAGREEMENT = "bank_disagreement"


def review_reason(verdict: Verdict, settings: ReviewSettings) -> str | None:
    """Why ``verdict`` goes to review, or None. Verdicts a bank or a person decided never go again."""
    if settings.topic is None or verdict.decided_by != "model":
        return None
    if verdict.label in settings.labels:
        return verdict.label
    if settings.degraded and verdict.degraded:
        return "degraded"
    return None


def review_request(verdict: Verdict, reason: str, event: ImageEvent, record: InRecord,
                   phash: PerceptualHash | None) -> ReviewRequest:
    located = {"image_uri": str(event.uri)} if event.uri is not None else {
        "source_topic": record.topic, "source_partition": record.partition, "source_offset": record.offset}
    return ReviewRequest(
        event_id=verdict.event_id,
        tenant=verdict.tenant,
        content_sha256=verdict.content_sha256,
        reason=reason,
        pdq=to_hex(phash) if phash is not None else None,
        pdq_quality=phash.quality if phash is not None else None,
        label=verdict.label,
        probability=verdict.probability,
        scores=verdict.scores,
        explanation=verdict.explanation,
        **located,  # type: ignore[arg-type]
    )


def bank_disagreement_request(verdict: Verdict, bank: str, bank_label: Literal["ai_generated", "real"],
                              image_uri: str | None, phash: PerceptualHash | None,
                              evidence: dict[str, str | int] | None = None) -> ReviewRequest:
    """Banked content the current models label otherwise (`streamguard rescore --bank`): a person decides
    which is wrong. ``verdict`` is the models' (its label, scores, explanation); the bank's label and the
    match go beside it, and into the explanation's evidence as a bank match is shown elsewhere."""
    explanation = verdict.explanation
    if explanation is not None:
        found = Evidence(kind="bank", name=bank, detail={"label": bank_label, **(evidence or {})})
        explanation = explanation.model_copy(update={"evidence": [found, *explanation.evidence]})
    return ReviewRequest(
        event_id=verdict.event_id,
        tenant=verdict.tenant,
        content_sha256=verdict.content_sha256,
        reason=BANK_DISAGREEMENT,
        image_uri=image_uri,
        pdq=to_hex(phash) if phash is not None else None,
        pdq_quality=phash.quality if phash is not None else None,
        label=verdict.label,
        probability=verdict.probability,
        scores=verdict.scores,
        explanation=explanation,
        bank=bank,
        bank_label=bank_label,
    )
