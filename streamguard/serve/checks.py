"""A check request as the event the worker would consume: an `ImageEvent` in the Kafka wire format.

The bytes of an upload travel as a binary-encoded event, a URI as a JSON one, so the processor parses
them exactly as it parses the stream's records (and refuses what it would refuse there).
"""

from __future__ import annotations

import uuid

from pydantic import AnyUrl, BaseModel, ConfigDict, Field

from streamguard.schemas import ImageEvent
from streamguard.wire import Headers, encode_event


class UriCheck(BaseModel):
    """The JSON body of ``POST /v1/check``. Unknown fields are refused: a typo is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")

    uri: AnyUrl
    tenant: str | None = Field(default=None, max_length=256)
    event_id: str | None = Field(default=None, min_length=1, max_length=256)


def new_event_id() -> str:
    return f"http-{uuid.uuid4().hex}"


def upload_event(data: bytes, content_type: str | None, tenant: str | None, event_id: str | None) -> ImageEvent:
    """Raises pydantic's ValidationError for an event id or tenant the worker would refuse too."""
    return ImageEvent(event_id=event_id or new_event_id(), image=data, content_type=content_type, tenant=tenant)


def uri_event(check: UriCheck, tenant: str | None) -> ImageEvent:
    return ImageEvent(event_id=check.event_id or new_event_id(), uri=check.uri, tenant=tenant)


def as_record(event: ImageEvent) -> tuple[bytes, Headers, bytes]:
    """(value, headers, key) of ``event`` on the wire."""
    value, headers = encode_event(event, "binary" if event.image is not None else "json")
    return value, headers, event.event_id.encode()
