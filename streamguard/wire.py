"""The two wire formats of an `ImageEvent` on Kafka.

- JSON: the record value is the event as JSON, the image base64 in ``image`` (or a ``uri``).
- binary: the record value is the raw image bytes; everything else travels in headers. This avoids the
  33% base64 overhead and a JSON parse of megabytes, which matters at ingest rates.

A record says which it is in the ``sg-encoding`` header; records without it are read as JSON so that
producers that cannot set headers still work.

Reading is tolerant by default: producers add fields before consumers upgrade, so an event field this
version does not know is dropped and reported (``ParsedEvent.unknown_fields``), not a dead letter.
``strict=True`` refuses such events instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from streamguard.errors import SchemaError
from streamguard.schemas import ImageEvent

Encoding = Literal["json", "binary"]
Headers = list[tuple[str, bytes]]

ENCODING_HEADER = "sg-encoding"
_PREFIX = "sg-"
# Header name -> ImageEvent field, for the scalar fields of the binary format.
_SCALAR_HEADERS = {
    "sg-schema-version": "schema_version",
    "sg-event-id": "event_id",
    "content-type": "content_type",
    "sg-source": "source",
    "sg-tenant": "tenant",
    "sg-created-at": "created_at",
}
_METADATA_HEADER = "sg-metadata"


def encode_event(event: ImageEvent, encoding: Encoding = "json") -> tuple[bytes, Headers]:
    """Return the record value and headers for ``event``."""
    if encoding == "json":
        return event.model_dump_json(exclude_none=True).encode(), [(ENCODING_HEADER, b"json")]
    if event.image is None:
        raise ValueError("the binary encoding carries inline bytes; a URI event must be sent as JSON")
    plain = event.model_dump(mode="json", exclude={"image", "uri", "metadata"}, exclude_none=True)
    headers: Headers = [(ENCODING_HEADER, b"binary")]
    for header, field in _SCALAR_HEADERS.items():
        if field in plain:
            headers.append((header, str(plain[field]).encode()))
    if event.metadata:
        headers.append((_METADATA_HEADER, json.dumps(event.metadata, separators=(",", ":")).encode()))
    return event.image, headers


@dataclass(frozen=True)
class ParsedEvent:
    event: ImageEvent
    unknown_fields: tuple[str, ...] = ()  # dropped by tolerant reading


def decode_event(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None = None,
                 strict: bool = False) -> ImageEvent:
    """Parse a record into an `ImageEvent`, raising `SchemaError` with a readable reason."""
    return parse_event(value, headers, strict).event


def parse_event(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None = None,
                strict: bool = False) -> ParsedEvent:
    """`decode_event`, also saying which unknown fields tolerant reading dropped."""
    header_map = _header_map(headers or ())
    encoding = header_map.get(ENCODING_HEADER, b"json").decode("ascii", "replace")
    if value is None:
        raise SchemaError("record has no value (tombstone)")
    if encoding == "json":
        return _decode_json(value, strict)
    if encoding == "binary":
        return ParsedEvent(_decode_binary(value, header_map))
    raise SchemaError(f"unknown {ENCODING_HEADER} {encoding!r}; expected 'json' or 'binary'")


def _header_map(headers: Iterable[tuple[str, bytes]]) -> dict[str, bytes]:
    return {name.lower(): raw for name, raw in headers if name.lower() == "content-type" or name.startswith(_PREFIX)}


def _decode_json(value: bytes, strict: bool) -> ParsedEvent:
    # The common case parses once; only an event with unknown fields is parsed a second time.
    try:
        return ParsedEvent(ImageEvent.model_validate_json(value))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if strict or any(err["type"] != "extra_forbidden" or len(err["loc"]) != 1 for err in errors):
            raise SchemaError(_describe(exc)) from None
        unknown = tuple(sorted(str(err["loc"][0]) for err in errors))
    data = json.loads(value)
    for name in unknown:
        data.pop(name, None)
    try:
        return ParsedEvent(ImageEvent.model_validate(data), unknown)
    except ValidationError as exc:
        raise SchemaError(_describe(exc)) from None


def _decode_binary(value: bytes, header_map: dict[str, bytes]) -> ImageEvent:
    fields: dict[str, object] = {}
    try:
        for header, field in _SCALAR_HEADERS.items():
            if header in header_map:
                fields[field] = header_map[header].decode("utf-8")
        if _METADATA_HEADER in header_map:
            fields["metadata"] = json.loads(header_map[_METADATA_HEADER])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"unreadable header: {exc}") from None
    if "schema_version" in fields:
        try:
            fields["schema_version"] = int(str(fields["schema_version"]))
        except ValueError:
            raise SchemaError(f"sg-schema-version is not an integer: {fields['schema_version']!r}") from None
    try:
        return ImageEvent.model_validate({**fields, "image": bytes(value)})
    except ValidationError as exc:
        raise SchemaError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
