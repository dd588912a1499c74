from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from streamguard.errors import SchemaError
from streamguard.schemas import RECORDS, DetectorScore, ImageEvent, Verdict, json_schemas
from streamguard.wire import decode_event, encode_event

SHA = "ab" * 32


def test_event_needs_exactly_one_payload() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        ImageEvent(event_id="e1")
    with pytest.raises(ValidationError, match="exactly one"):
        ImageEvent(event_id="e1", image=b"x", uri="https://example.com/a.jpg")
    assert ImageEvent(event_id="e1", uri="https://example.com/a.jpg").uri is not None


def test_event_refuses_non_http_uri_and_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="scheme"):
        ImageEvent(event_id="e1", uri="file:///etc/passwd")
    with pytest.raises(ValidationError, match="extra"):
        ImageEvent.model_validate({"event_id": "e1", "image": "AAAA", "colour": "red"})


def test_image_is_base64_in_json() -> None:
    event = ImageEvent(event_id="e1", image=b"\x00\xffbytes")
    doc = json.loads(event.model_dump_json())
    assert doc["image"] == "AP9ieXRlcw=="
    assert ImageEvent.model_validate_json(event.model_dump_json()).image == b"\x00\xffbytes"
    with pytest.raises(ValidationError, match="base64"):
        ImageEvent.model_validate_json('{"event_id": "e1", "image": "not base64!"}')


def test_detector_score_refuses_non_finite_logit() -> None:
    with pytest.raises(ValidationError):
        DetectorScore(detector="d", version="1", logit=float("nan"), latency_ms=1.0)


def test_verdict_label_is_constrained() -> None:
    with pytest.raises(ValidationError):
        Verdict(event_id="e", content_sha256=SHA, label="fake", probability=0.9, scores=[],
                policy_version="p", model_versions={})


def test_json_schemas_cover_every_record() -> None:
    schemas = json_schemas()
    assert set(schemas) == set(RECORDS) == {"image-event", "detector-score", "verdict", "dead-letter",
                                               "review-request", "review-decision"}
    assert schemas["image-event"]["properties"]["image"]["anyOf"][0]["contentEncoding"] == "base64"
    assert "schema_version" in schemas["verdict"]["properties"]


metadata_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=20))
events = st.builds(
    ImageEvent,
    event_id=st.text(min_size=1, max_size=40).filter(lambda s: s.strip() == s and s),
    image=st.binary(min_size=1, max_size=256),
    content_type=st.sampled_from([None, "image/jpeg", "image/png"]),
    source=st.one_of(st.none(), st.text(max_size=20)),
    tenant=st.one_of(st.none(), st.text(max_size=20)),
    metadata=st.dictionaries(st.text(max_size=10), metadata_values, max_size=4),
)


@given(events, st.sampled_from(["json", "binary"]))
def test_wire_round_trip(event: ImageEvent, encoding: str) -> None:
    value, headers = encode_event(event, encoding)  # type: ignore[arg-type]
    assert decode_event(value, headers) == event
    if encoding == "binary":
        assert value == event.image  # raw bytes, no base64


def test_records_without_encoding_header_are_json() -> None:
    event = ImageEvent(event_id="e1", image=b"img")
    assert decode_event(event.model_dump_json().encode(), None) == event


def test_uri_events_cannot_be_binary() -> None:
    with pytest.raises(ValueError, match="binary"):
        encode_event(ImageEvent(event_id="e1", uri="https://example.com/x.png"), "binary")


@pytest.mark.parametrize(
    ("value", "headers", "match"),
    [
        (b"{not json", None, "Invalid JSON"),
        (b'{"event_id": "e1"}', None, "exactly one"),
        (b'{"schema_version": 2, "event_id": "e1", "image": "AAAA"}', None, "schema_version"),
        (None, None, "tombstone"),
        (b"\xff\xd8", [("sg-encoding", b"protobuf")], "unknown sg-encoding"),
        (b"\xff\xd8", [("sg-encoding", b"binary")], "event_id"),
        (b"\xff\xd8", [("sg-encoding", b"binary"), ("sg-event-id", b"e"), ("sg-metadata", b"{")], "header"),
        (b"\xff\xd8", [("sg-encoding", b"binary"), ("sg-event-id", b"e"), ("sg-schema-version", b"x")], "integer"),
    ],
    ids=["bad-json", "no-payload", "future-version", "tombstone", "unknown-encoding", "binary-no-id",
         "bad-metadata-header", "bad-version-header"],
)
def test_bad_records_raise_schema_error(value: bytes | None, headers, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SchemaError, match=match):
        decode_event(value, headers)
