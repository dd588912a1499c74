"""The worker with another Kafka client on the other side: librdkafka (confluent-kafka) produces events with
every codec in both wire formats and reads back the verdicts and dead letters; and the worker, set to each
codec, publishes what librdkafka reads. Against the real broker (Tansu), which takes all five codecs.

Both clients skip compression when it would not shrink a batch, so the images here are BMPs (they compress
well) and each test checks, by decoding the stored batches, that the codec really was used.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer
from confluent_kafka import Message as RdMessage
from confluent_kafka import TopicPartition as RdTopicPartition
from images import encode, solid
from kafka.record.default_records import DefaultRecordBatch
from stack import Topics, WorkerProcess, image_events, produce, worker_env

from streamguard.config import load_settings
from streamguard.devstack import Service
from streamguard.streamio import Message, Outcomes, Sent, TopicReader, decode_headers, missing
from streamguard.worker.publish import producer_config

CODECS = ["gzip", "snappy", "lz4", "zstd"]
# The codec ids of a record batch's attributes (Kafka's protocol).
CODEC_NAMES = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


def _images() -> list[bytes]:
    """Two good images (bright: ai_generated, dark: real) and a truncated one, all compressible."""
    bright, dark = encode(solid(250, (48, 40)), "BMP"), encode(solid(5, (48, 40)), "BMP")
    return [bright, dark, bright[: len(bright) // 2]]


# -- librdkafka -----------------------------------------------------------------------------------------


def _produce_librdkafka(bootstrap: str, topic: str, messages: Iterable[Message], codec: str) -> list[Sent]:
    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "acks": "all",
                         "linger.ms": 20})
    results: list[Sent | str] = []

    def delivered(event_id: str | None) -> Callable[[KafkaError | None, RdMessage], None]:
        def report(err: KafkaError | None, msg: RdMessage) -> None:
            results.append(str(err) if err else Sent(event_id, msg.partition(), msg.offset()))
        return report

    for event_id, value, headers in messages:
        producer.produce(topic, key=event_id.encode() if event_id else None, value=value, headers=headers,
                         on_delivery=delivered(event_id))
    assert producer.flush(30) == 0, "librdkafka could not deliver everything within 30 s"
    assert all(isinstance(r, Sent) for r in results), results
    return [r for r in results if isinstance(r, Sent)]


@dataclass
class Read:
    outcomes: Outcomes
    verdict_headers: dict[str, dict[str, str]]  # by event id
    dead_values: dict[tuple[int, int], bytes]  # the dead letter's value, by the original's position


def _read_librdkafka(bootstrap: str, topics: Topics, sent: list[Sent], timeout_s: float = 60) -> Read:
    """Every verdict and dead letter, from the beginning, until each sent record has one."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"interop-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False})
    read = Read(Outcomes(), {}, {})
    try:
        consumer.assign([RdTopicPartition(topic, p, OFFSET_BEGINNING) for topic in (topics.output, topics.dlq)
                         for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions])
        deadline = time.monotonic() + timeout_s
        while missing(sent, read.outcomes):
            assert time.monotonic() < deadline, f"no outcome for {missing(sent, read.outcomes)}"
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            dead = msg.topic() == topics.dlq
            read.outcomes.add(dead, msg.value(), msg.headers())
            if dead:
                letter = read.outcomes.dead_letters[-1]
                read.dead_values[(letter["original_partition"], letter["original_offset"])] = msg.value() or b""
            else:
                read.verdict_headers[read.outcomes.verdicts[-1]["event_id"]] = decode_headers(msg.headers())
    finally:
        consumer.close()
    return read


# -- what the broker holds ------------------------------------------------------------------------------


@pytest.fixture
def batch_codecs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, str]]]:
    """(first offset, last offset, codec) of every record batch kafka-python decodes in this test: the codec
    each batch is stored with, which no client's API tells."""
    seen: list[tuple[int, int, str]] = []
    original = DefaultRecordBatch._maybe_uncompress

    def spy(batch: DefaultRecordBatch) -> None:
        seen.append((batch.base_offset, batch.last_offset, CODEC_NAMES[batch.compression_type]))
        original(batch)

    monkeypatch.setattr(DefaultRecordBatch, "_maybe_uncompress", spy)
    yield seen


def _stored_codecs(bootstrap: str, topics: Iterable[str], batches: list[tuple[int, int, str]],
                   records: int) -> list[tuple[int, int, str]]:
    """Reads the topics from the beginning until ``records`` are in: the batches that held them."""
    batches.clear()
    with TopicReader({"bootstrap_servers": bootstrap}, list(topics), wait_s=10) as reader:
        deadline, seen = time.monotonic() + 30, 0
        while seen < records:
            assert time.monotonic() < deadline, f"{seen} of {records} records read back"
            seen += len(reader.poll())
    return list(batches)


# -- librdkafka in, librdkafka out ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def topics(kafka: Service) -> Topics:
    # One partition: a batch's offsets then say which events it holds.
    return Topics(kafka.address, partitions=1).create()


@pytest.fixture(scope="module")
def worker(topics: Topics, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One worker for every codec and encoding, with the default kafka.compression_type (none)."""
    process = WorkerProcess(worker_env(topics, None), tmp_path_factory.mktemp("interop"))
    yield process
    process.signal(signal.SIGTERM)
    assert process.wait(60) == 0, process.log_path.read_text()[-3000:]


@pytest.mark.parametrize("encoding", ["json", "binary"])
@pytest.mark.parametrize("codec", ["none", *CODECS])
def test_librdkafka_events_with_every_codec_get_verdicts_and_dead_letters(
        codec: str, encoding: str, topics: Topics, worker: WorkerProcess,
        batch_codecs: list[tuple[int, int, str]]) -> None:
    prefix = f"{codec}-{encoding}"
    messages = image_events(_images(), encoding, prefix=prefix)  # type: ignore[arg-type]
    good, bad = messages[:2], messages[2]
    sent = _produce_librdkafka(topics.bootstrap, topics.input, messages, codec)

    stored = _stored_codecs(topics.bootstrap, [topics.input], batch_codecs, max(s.offset for s in sent) + 1)
    mine = {name for first, last, name in stored for s in sent if first <= s.offset <= last}
    assert mine == {codec}, f"the broker holds these events as {mine}, not {codec}"

    read = _read_librdkafka(topics.bootstrap, topics, sent)
    by_id = {v["event_id"]: v for v in read.outcomes.verdicts}
    assert [by_id[event_id]["label"] for event_id, _, _ in good] == ["ai_generated", "real"]
    for event_id, _, _ in good:
        assert read.verdict_headers[event_id]["sg-record"] == "verdict"
        assert read.verdict_headers[event_id]["sg-label"] == by_id[event_id]["label"]
    assert bad[0] not in by_id
    where = next(s for s in sent if s.event_id == bad[0])
    letter = next(d for d in read.outcomes.dead_letters
                  if (d["original_partition"], d["original_offset"]) == (where.partition, where.offset))
    headers = letter["headers"]
    assert letter["error_type"] == "CorruptImage" and headers["sg-dlt-exception-class"] == "CorruptImage"
    assert headers["sg-dlt-stage"] == letter["stage"] == "decode"
    assert headers["sg-dlt-original-topic"] == topics.input and headers["sg-dlt-group"] == topics.group
    assert (headers["sg-dlt-original-partition"], headers["sg-dlt-original-offset"]) == (
        str(where.partition), str(where.offset))
    assert headers["sg-encoding"] == encoding  # the original's headers travel with it
    assert read.dead_values[(where.partition, where.offset)] == bad[1]  # byte for byte, for replay


# -- the worker's own codec -----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_worker_publishing_with_each_codec_is_read_by_librdkafka(
        codec: str, kafka: Service, tmp_path: Path, batch_codecs: list[tuple[int, int, str]]) -> None:
    # A worker of its own: the codec is a setting of the process.
    topics = Topics(kafka.address, partitions=1).create()
    process = WorkerProcess(worker_env(topics, None, STREAMGUARD_KAFKA__COMPRESSION_TYPE=codec), tmp_path)
    try:
        # In through the harness with the same codec: kafka-python compressing, kafka-python decoding.
        sent = produce(topics, image_events(_images(), "binary", prefix=codec), compression_type=codec)
        read = _read_librdkafka(topics.bootstrap, topics, sent)
    finally:
        process.signal(signal.SIGTERM)
        assert process.wait(60) == 0, process.log_path.read_text()[-3000:]
    assert sorted(read.outcomes.verdict_ids()) == [f"{codec}-0", f"{codec}-1"]
    assert [d["error_type"] for d in read.outcomes.dead_letters] == ["CorruptImage"]
    assert {name for _, _, name in _stored_codecs(topics.bootstrap, [topics.input], batch_codecs, 3)} == {codec}
    out = _stored_codecs(topics.bootstrap, [topics.output, topics.dlq], batch_codecs, 3)
    assert {name for _, _, name in out} == {codec}, "the worker published with another codec"


# -- the setting ----------------------------------------------------------------------------------------


def test_compression_type_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert producer_config(load_settings())["compression_type"] is None
    monkeypatch.setenv("STREAMGUARD_KAFKA__COMPRESSION_TYPE", "zstd")
    assert producer_config(load_settings())["compression_type"] == "zstd"
    monkeypatch.setenv("STREAMGUARD_KAFKA__COMPRESSION_TYPE", "none")  # as Kafka spells off
    assert load_settings().kafka.compression_type is None
    with pytest.raises(ValueError, match="compression_type"):
        load_settings(kafka={"compression_type": "brotli"})
