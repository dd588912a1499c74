"""The poison suite: every kind of bad record the worker meets, against the real broker.

Each bad record must end as exactly one dead letter with its reason, the worker must stay alive, and every
offset must be committed; the suite runs twice in a row (a second worker process on the same group), so a
record that could crash-loop a worker would show up as a missing outcome or an exit.
"""

from __future__ import annotations

import io
import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from images import encode, noise, png_bomb, solid, truncated_jpeg
from stack import (
    Topics,
    WorkerProcess,
    committed_offsets,
    produce,
    wait_for_outcomes,
    worker_env,
)
from streamguard.devstack import Service
from streamguard.schemas import ImageEvent
from streamguard.streamio import Message, Sent, event_message, partition_ends

FAULT_GRAY = 13  # streamguard_testdetector.faults: fusing this gray raises MemoryError
MAX_RECORD = 2 * 1024 * 1024
MAX_HEADERS = 64 * 1024


class NotUtf8(str):
    """A header key that kafka-python writes as bytes that are not UTF-8, as a foreign client can."""

    def encode(self, *args: object, **kwargs: object) -> bytes:  # type: ignore[override]
        return b"\xff\xfe-key"


def _binary(event_id: str, value: bytes | None, **headers: bytes) -> Message:
    base = [("sg-encoding", b"binary"), ("sg-event-id", event_id.encode())]
    return event_id, value, base + [(k.replace("_", "-"), v) for k, v in headers.items()]


def _json(event_id: str, body: object) -> Message:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return event_id, raw, [("sg-encoding", b"json")]


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _long_png() -> bytes:
    return encode(Image.new("L", (1, 100_000)), "PNG")


# (message, expected error type). Each is its own kind of bad record.
def poison() -> list[tuple[Message, str]]:
    png = encode(solid(200), "PNG")
    return [
        (_json("bad-json", b'{"event_id": "bad-json", "image": '), "SchemaError"),
        (_json("not-json", b"\x00\x01binary garbage\xff"), "SchemaError"),
        (_json("json-array", [1, 2, 3]), "SchemaError"),
        (_json("no-payload", {"event_id": "no-payload"}), "SchemaError"),
        (_json("two-payloads", {"event_id": "two-payloads", "image": _b64(png), "uri": "https://e.com/a.png"}),
         "SchemaError"),
        (_json("empty-id", {"event_id": "", "image": _b64(png)}), "SchemaError"),
        (_json("bad-base64", {"event_id": "bad-base64", "image": "!!not base64!!"}), "SchemaError"),
        (_json("ftp-uri", {"event_id": "ftp-uri", "uri": "ftp://example.com/a.png"}), "SchemaError"),
        (_json("schema-v9", {"schema_version": 9, "event_id": "schema-v9", "image": _b64(png)}), "SchemaError"),
        (("xml", png, [("sg-encoding", b"xml")]), "SchemaError"),
        (("tombstone", None, []), "SchemaError"),
        (("binary-no-id", png, [("sg-encoding", b"binary")]), "SchemaError"),
        (_binary("bad-header-bytes", png, sg_source=b"\xff\xfe"), "SchemaError"),
        (_binary("bad-metadata", png, sg_metadata=b"{not json"), "SchemaError"),
        (_binary("bad-version", png, sg_schema_version=b"two"), "SchemaError"),
        (_binary("truncated-jpeg", truncated_jpeg()), "CorruptImage"),
        (_binary("empty-image", b""), "EmptyImage"),
        (_binary("text-as-jpg", b"hello, I am a text file named .jpg\n"), "UnsupportedFormat"),
        (_binary("bmp-not-allowed", encode(solid(200), "BMP")), "UnsupportedFormat"),
        (_binary("png-bomb", png_bomb()), "TooLarge"),
        (_binary("one-by-100000", _long_png()), "UnsupportedGeometry"),
        (_binary("oversized", b"\xff\xd8" + b"\x00" * (MAX_RECORD + 1)), "RecordTooLarge"),
        (("header-bomb", b"x", [("sg-encoding", b"binary"), ("sg-event-id", b"header-bomb"),
                                ("x-bomb", b"\x00" * (26 * 1024 * 1024))]), "HeadersTooLarge"),
        (event_message(ImageEvent(event_id="uri-loopback", uri="http://127.0.0.1:9/secret.png"), "json"),
         "FetchRefused"),
        (event_message(ImageEvent(event_id="uri-private", uri="http://[fec0::1]/a.png"), "json"), "FetchRefused"),
        (event_message(ImageEvent(event_id="uri-unreachable", uri="http://unreachable.invalid/a.png"), "json"),
         "FetchFailed"),
        (_binary("fails-in-detect", encode(solid(FAULT_GRAY), "PNG")), "InternalError"),
        (_binary("replayed-dead-letter", truncated_jpeg(), sg_dlt_attempt=b"2"), "CorruptImage"),
    ]


def unreadable(round_: int) -> list[Message]:
    """A record kafka-python cannot parse. Sent alone: kafka-python cannot read past a bad record inside
    a batch either, so the records after it in the same batch become dead letters naming their offsets."""
    return [(f"utf8-key-{round_}", encode(solid(200), "PNG"),
             [("sg-encoding", b"binary"), (NotUtf8("sg-event-id"), b"utf8-key")])]


def good(round_: int) -> list[Message]:
    """Good events between the bad ones: each must get a verdict."""
    newer = {"event_id": f"newer-field-{round_}", "image": _b64(encode(noise((40, 32), seed=round_), "PNG")),
             "added_by_a_newer_producer": True}
    primary, preview = noise((64, 48), seed=100 + round_), solid(10, (32, 24))
    mpo = io.BytesIO()
    primary.save(mpo, format="MPO", save_all=True, append_images=[preview])
    return [
        _json(newer["event_id"], newer),
        _binary(f"mpo-phone-{round_}", mpo.getvalue()),
        *[_binary(f"good-{round_}-{i}", encode(noise((40, 32), seed=round_ * 100 + i), "PNG")) for i in range(4)],
    ]


def _run_round(topics: Topics, tmp_path: Path, round_: int, env: dict[str, str], earlier: list[Sent]) -> list[Sent]:
    bad = poison()
    expected = {f"{message[0]}": error for message, error in bad}
    worker = WorkerProcess(env, tmp_path, f"round{round_}")
    try:
        # Batches compressed with a codec this worker lacks (lz4 is blocked in its environment): each of
        # their records becomes a dead letter of its own, and the partition goes on.
        # One key, so the three land in one partition. Stored PNGs of flat colour: kafka-python's producer
        # sends a batch uncompressed when lz4 would not shrink it, and a noise PNG sent alone (the sender
        # may flush before the next record joins) did not, so that record was readable after all.
        lz4_batch = produce(topics, [_binary(f"lz4-{round_}", encode(solid(40 + i, (24, 24)), "PNG", compress_level=0))
                                     for i in range(3)], compression_type="lz4")
        messages = [m for pair in zip([m for m, _ in bad], good(round_) * 5, strict=False) for m in pair]
        sent = produce(topics, messages[:20]) + produce(topics, unreadable(round_)) + produce(topics, messages[20:])
        # A bad record with good ones after it in one batch (one key): kafka-python cannot read past it.
        mates = produce(topics, [(f"utf8-batch-{round_}", m[1], m[2]) for m in
                                 [*unreadable(round_), *[_binary("mate", encode(noise((24, 24), seed=9 + i), "PNG"))
                                                         for i in range(2)]]])
        sent += lz4_batch + mates
        outcomes = wait_for_outcomes(topics, sent, timeout=120)
        assert worker.proc.poll() is None, "the worker died"
        _wait_committed(topics, partition_ends(sent + earlier))
    finally:
        worker.signal(signal.SIGTERM)
        code = worker.wait(60)
    assert code == 0, worker.log_path.read_text()[-3000:]
    assert "Traceback" not in "".join(line for line in worker.log_path.read_text().splitlines()
                                      if not line.startswith("{"))

    round_sent = {s.event_id: s for s in sent}
    letters = Counter((d["original_partition"], d["original_offset"]) for d in outcomes.dead_letters)
    by_position = {(d["original_partition"], d["original_offset"]): d for d in outcomes.dead_letters}
    for event_id, error in expected.items():
        s: Sent = round_sent[event_id]
        assert letters[(s.partition, s.offset)] == 1, f"{event_id}: {letters[(s.partition, s.offset)]} dead letters"
        letter = by_position[(s.partition, s.offset)]
        assert letter["error_type"] == error, f"{event_id}: {letter['error_type']}: {letter['message']}"
        assert letter["message"] and letter["headers"]["sg-dlt-exception-class"] == error
        assert letter["headers"]["sg-dlt-original-topic"] == topics.input
    (utf8,) = [s for s in sent if s.event_id == f"utf8-key-{round_}"]
    utf8_letter = by_position[(utf8.partition, utf8.offset)]
    assert letters[(utf8.partition, utf8.offset)] == 1 and utf8_letter["error_type"] == "UnreadableRecord"
    assert utf8_letter["stage"] == "consume" and "CorruptRecordError" in utf8_letter["message"]
    mate_letters = [by_position[(s.partition, s.offset)] for s in mates]
    assert [letters[(s.partition, s.offset)] for s in mates] == [1, 1, 1]
    assert {d["error_type"] for d in mate_letters} == {"UnreadableRecord"}
    assert all("after an unreadable record" in d["message"] for d in mate_letters[1:])
    for s in lz4_batch:
        assert letters[(s.partition, s.offset)] == 1, (
            f"lz4 record at {s.partition}/{s.offset}: {letters[(s.partition, s.offset)]} dead letters; letters in "
            f"that partition: {sorted(o for p, o in letters if p == s.partition)}; lz4 sent at "
            f"{[(x.partition, x.offset) for x in lz4_batch]}\n" + worker.log_path.read_text()[-3000:])
        assert by_position[(s.partition, s.offset)]["error_type"] == "UnreadableRecord"
    verdict_ids = Counter(outcomes.verdict_ids())
    for event_id in {m[0] for m in good(round_)}:
        assert verdict_ids[event_id] >= 1, f"no verdict for {event_id}"

    named = {d["event_id"]: d for d in outcomes.dead_letters if d.get("event_id")}
    assert named["fails-in-detect"]["stage"] == "detect"
    assert named["replayed-dead-letter"]["attempt"] == 3
    bomb = by_position[(round_sent["header-bomb"].partition, round_sent["header-bomb"].offset)]
    assert "x-bomb" not in bomb["headers"] and bomb["headers"]["sg-dlt-headers-omitted"].startswith("1 headers")
    return sent


def _wait_committed(topics: Topics, ends: dict[int, int], timeout: float = 30) -> None:
    """Until the group committed every offset sent (the acknowledgements say where each landed)."""
    deadline = time.monotonic() + timeout
    while committed_offsets(topics) != ends:
        assert time.monotonic() < deadline, f"committed {committed_offsets(topics)} != sent {ends}"
        time.sleep(0.5)


@pytest.fixture
def lz4_blocked(tmp_path: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes ``import lz4`` fail as on a host without the codec."""
    shim = tmp_path / "no-lz4"
    (shim / "lz4").mkdir(parents=True)
    (shim / "lz4" / "__init__.py").write_text('raise ImportError("lz4 blocked by the test")\n')
    return shim


def test_every_kind_of_poison_is_one_dead_letter_twice_in_a_row(kafka: Service, redis_service: Service,
                                                                 lz4_blocked: Path, tmp_path: Path) -> None:
    topics = Topics(kafka.address, partitions=2).create()
    env = worker_env(
        topics, f"redis://{redis_service.address}/0",
        STREAMGUARD_TEST_FAULTS="1",
        STREAMGUARD_WORKER__MAX_RECORD_BYTES=str(MAX_RECORD),
        STREAMGUARD_WORKER__MAX_HEADER_BYTES=str(MAX_HEADERS),
        STREAMGUARD_WORKER__DEAD_LETTER_MAX_VALUE_BYTES=str(100 * 1024),
        STREAMGUARD_INTAKE__FORMATS='["JPEG", "PNG", "WEBP", "GIF"]',
        STREAMGUARD_FETCH__TIMEOUT_S="2",
    )
    env["PYTHONPATH"] = f"{lz4_blocked}:{env.get('PYTHONPATH', '')}"
    assert len(poison()) + len(unreadable(1)) + 1 >= 25  # + the lz4 batch
    first = _run_round(topics, tmp_path, 1, env, [])
    _run_round(topics, tmp_path, 2, env, first)
