"""What a check's outcome is over HTTP: a verdict is a 200; a dead letter is the status its reason
deserves, with the reason in the body (the same error type and message the worker's dead letter has)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamguard.schemas import DeadLetter

# By the dead letter's error type; anything not named is the server's fault (500).
_STATUS = {
    "SchemaError": 422,
    "RecordTooLarge": 413,
    "HeadersTooLarge": 422,
    "UnsupportedFormat": 400,
    "CorruptImage": 400,
    "EmptyImage": 400,
    "UnsupportedGeometry": 400,
    "TooLarge": 413,  # over intake's byte or pixel limit (a decompression bomb too)
    # The client named a URI the service must not or cannot use.
    "FetchRefused": 422,
    "TooManyRedirects": 422,
    "FetchTooLarge": 422,
    # The client's URI did not answer: an upstream failure, not a malformed request.
    "FetchFailed": 502,
}


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    retry_after_s: float | None = None


def error(status: int, error_type: str, reason: str, **extra: Any) -> Answer:
    return Answer(status, {"error": error_type, "reason": reason, **extra})


def for_dead_letter(letter: DeadLetter) -> Answer:
    status = _STATUS.get(letter.error_type, 500)
    if letter.error_type == "InternalError" and "DetectorsUnavailable" in letter.message:
        # A detector's server is down (the worker would hold the stream): try again shortly.
        return Answer(503, _body(letter), retry_after_s=5.0)
    return Answer(status, _body(letter))


def _body(letter: DeadLetter) -> dict[str, Any]:
    return {"error": letter.error_type, "reason": letter.message, "stage": letter.stage,
            "event_id": letter.event_id}
