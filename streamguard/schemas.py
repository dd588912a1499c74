"""Wire-level records: what enters and leaves streamguard.

These pydantic models are the edges of the system; everything inside works on dataclasses. Each record
carries ``schema_version`` so consumers can route or reject records from a newer producer instead of
misreading them. Bump the version on any breaking change and keep the old reader until producers move.
"""

from __future__ import annotations

import base64
import binascii
import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AnyUrl,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

# Raw bytes inside Python; base64 text on the JSON wire (see ImageEvent's validator and serializer).
Base64Image = Annotated[bytes, WithJsonSchema({"type": "string", "contentEncoding": "base64"})]

Label = Literal["ai_generated", "real", "uncertain"]


def _now() -> datetime:
    return datetime.now(UTC)


class _Record(BaseModel):
    # Unknown fields are refused: a typo in a producer is a dead letter, not silently dropped data.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageEvent(_Record):
    """An image to judge: the bytes inline, or a URI the worker fetches."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str = Field(min_length=1, max_length=256)
    image: Base64Image | None = Field(default=None, description="Image bytes; base64 in JSON.")
    uri: AnyUrl | None = Field(default=None, description="http(s) URI to fetch the image from.")
    content_type: str | None = Field(default=None, max_length=128)
    source: str | None = Field(default=None, max_length=256)
    tenant: str | None = Field(default=None, max_length=256)
    created_at: datetime = Field(default_factory=_now)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one_payload(self) -> ImageEvent:
        if (self.image is None) == (self.uri is None):
            raise ValueError("exactly one of 'image' and 'uri' must be set")
        return self

    @field_validator("image", mode="before")
    @classmethod
    def _from_base64(cls, image: object) -> object:
        # JSON carries text, so a str is base64; Python callers (and the binary wire format) pass bytes.
        if isinstance(image, str):
            try:
                return base64.b64decode(image, validate=True)
            except binascii.Error:
                raise ValueError("image is not valid base64") from None
        return image

    @field_serializer("image", when_used="json")
    def _to_base64(self, image: bytes | None) -> str | None:
        return None if image is None else base64.b64encode(image).decode("ascii")

    @field_validator("uri")
    @classmethod
    def _http_only(cls, uri: AnyUrl | None) -> AnyUrl | None:
        if uri is not None and uri.scheme not in ("http", "https"):
            raise ValueError(f"uri scheme must be http or https, not {uri.scheme!r}")
        return uri


class DetectorScore(_Record):
    """One detector's opinion of one image.

    ``logit`` is calibrated (what fusion averages) and ``probability`` its sigmoid; ``raw_logit`` is what
    the model returned, before calibration (what evaluation and calibration fitting read). All three are
    None when the detector failed (``error`` says why) or abstained (no ``error``: it had no evidence either
    way, as a metadata detector on an image without metadata). ``raw_logit`` is also None in records written
    before it existed.
    """

    detector: str
    version: str
    probability: float | None = Field(default=None, ge=0.0, le=1.0)
    logit: float | None = None
    raw_logit: float | None = Field(default=None, description="The model's logit before calibration.")
    latency_ms: float = Field(ge=0.0)
    error: str | None = None

    @field_validator("logit", "raw_logit")
    @classmethod
    def _finite(cls, logit: float | None) -> float | None:
        if logit is not None and not math.isfinite(logit):
            raise ValueError("logits must be finite")
        return logit

    @property
    def ok(self) -> bool:
        return self.error is None and self.logit is not None


class NearDuplicate(_Record):
    event_id: str | None = Field(description="None when the match is another tenant's content (shared dedupe).")
    content_sha256: str
    distance: int = Field(ge=0, description="PDQ Hamming distance.")


class DetectorContribution(_Record):
    """What one detector added to the fused logit: ``weight * logit / total weight`` (None: it failed or
    abstained)."""

    detector: str
    weight: float
    logit: float | None = None
    contribution: float | None = None


class Evidence(_Record):
    """Something besides the detectors that bore on the verdict: a hash-bank match, a credential, a review."""

    kind: str = Field(description="bank, credential, review, shared_cache, ...")
    name: str = Field(description="Which bank, credential issuer, reviewer, ...")
    detail: dict[str, JsonValue] = Field(default_factory=dict)


class Explanation(_Record):
    """What drove a verdict: each detector's share of the fused logit, the thresholds and tenant policy."""

    tenant: str | None = None
    policy_version: str | None = None
    ai_threshold: float | None = None
    real_threshold: float | None = None
    fusion_method: str | None = None
    fused_logit: float | None = None
    calibration_bias: float | None = Field(
        None, description="The fusion's calibration bias: with the contributions it adds up to fused_logit.")
    contributions: list[DetectorContribution] = Field(default_factory=list)
    failed_detectors: list[str] = Field(default_factory=list)
    evidence: list[Evidence] = Field(default_factory=list)


class MatchedBank(_Record):
    bank: str
    kind: Literal["exact", "near"]
    distance: int = Field(ge=0, description="PDQ Hamming distance; 0 for an exact (SHA-256) match.")


class RescoredFrom(_Record):
    """The earlier judgement a re-scored verdict replaces (`streamguard rescore`)."""

    label: Label
    policy_version: str
    model_versions: dict[str, str]
    judged_at: datetime | None = None


class Verdict(_Record):
    """The judgement published for one event."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    label: Label
    probability: float | None = Field(ge=0.0, le=1.0, description="Fused probability of AI generation.")
    scores: list[DetectorScore]
    policy_version: str
    model_versions: dict[str, str]
    duplicate_of: str | None = Field(
        default=None, description="Event id whose verdict this one reuses (dedupe hit), if any."
    )
    near_duplicate_of: NearDuplicate | None = Field(
        default=None, description="A perceptually similar image judged before (reused or only noted)."
    )
    timings_ms: dict[str, float] = Field(default_factory=dict, description="Milliseconds per stage.")
    judged_at: datetime = Field(default_factory=_now)
    degraded: bool = Field(
        False, description="Some detector failed or timed out: judged by the others, never cached for reuse."
    )
    failed_detectors: list[str] = Field(default_factory=list, description="The detectors that failed, if any.")
    tenant: str | None = Field(default=None, description="The event's tenant (\"default\" when it named none).")
    explanation: Explanation | None = Field(default=None, description="What drove the verdict.")
    matched_bank: MatchedBank | None = Field(
        default=None, description="Answered from a hash bank before any detector ran (no scores).")
    decided_by: Literal["model", "bank", "review"] = Field(
        "model", description="model: the detectors and policy; bank: a hash-bank match; review: a person.")
    rescored_from: RescoredFrom | None = Field(
        default=None, description="Set when `streamguard rescore` published this verdict because the current "
        "models or policy changed the label: the judgement it replaces.")


class DeadLetter(_Record):
    """Why an input could not be judged. Published beside the original record bytes."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str | None = None
    error_type: str = Field(description="Error class, e.g. CorruptImage, SchemaError, FetchError.")
    message: str
    stage: str = Field(description="Pipeline stage that failed: consume (the client could not read the record), "
                       "parse, fetch, bank, dedupe, decode, bank_near, near_dedupe, detect, publish; review (a "
                       "decision `review apply` could not read).")
    original_topic: str | None = None
    original_partition: int | None = None
    original_offset: int | None = None
    original_timestamp_ms: int | None = None
    group_id: str | None = None
    attempt: int = 1
    failed_at: datetime = Field(default_factory=_now)
    tenant: str | None = None


class ReviewRequest(_Record):
    """A verdict that needs a person, on the review topic: enough to show the image and decide."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    tenant: str | None = None
    content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    reason: str = Field(description="Why it needs review: the label (uncertain, ...), degraded, or "
                        "bank_disagreement (`streamguard rescore --bank`: the models now disagree with a bank).")
    image_uri: str | None = Field(default=None, description="Where to fetch the image, for URI events.")
    source_topic: str | None = Field(default=None, description="Else the original record: topic, partition, offset.")
    source_partition: int | None = None
    source_offset: int | None = None
    pdq: str | None = Field(default=None, description="PDQ hash (64 hex digits), for the bank on decision.")
    pdq_quality: int | None = Field(default=None, ge=0, le=100)
    label: Label
    probability: float | None = Field(default=None, ge=0.0, le=1.0)
    scores: list[DetectorScore] = Field(default_factory=list)
    explanation: Explanation | None = None
    bank: str | None = Field(default=None, description="bank_disagreement: the bank holding the content.")
    bank_label: Literal["ai_generated", "real"] | None = Field(
        default=None, description="bank_disagreement: the bank's label, which `label` (the models') contradicts.")
    requested_at: datetime = Field(default_factory=_now)


class ReviewDecision(_Record):
    """A reviewer's answer, on the decisions topic. Copy ``pdq``/``pdq_quality`` from the request so that
    near-duplicates match the bank entry, and ``image_uri`` so that the bank entry can be judged again
    (`streamguard rescore --bank`)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str | None = None
    label: Literal["ai_generated", "real"]
    reviewer: str = Field(min_length=1, max_length=256)
    note: str | None = Field(default=None, max_length=4000)
    pdq: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    pdq_quality: int | None = Field(default=None, ge=0, le=100)
    image_uri: str | None = Field(default=None, max_length=4096,
                                  description="The request's image_uri: kept with the bank entry.")
    decided_at: datetime = Field(default_factory=_now)


RECORDS: dict[str, type[BaseModel]] = {
    "image-event": ImageEvent,
    "detector-score": DetectorScore,
    "verdict": Verdict,
    "dead-letter": DeadLetter,
    "review-request": ReviewRequest,
    "review-decision": ReviewDecision,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema() for name, model in RECORDS.items()}
