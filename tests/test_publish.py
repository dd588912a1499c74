"""`Publisher` against the real broker: one acknowledgement per record, whatever its outcome is made of.

The worker commits a record only on its acknowledgement, so a record acknowledged twice, or not at all,
or acknowledged before its every message was sent, would break at-least-once or block its partition.
"""

from __future__ import annotations

import queue

import pytest
from kafka import KafkaProducer
from stack import Topics

from streamguard.config import Settings, load_settings
from streamguard.devstack import Service, create_topics
from streamguard.schemas import DeadLetter, ReviewRequest, Verdict
from streamguard.streamio import TopicReader
from streamguard.worker.publish import Ack, Publisher, producer_config
from streamguard.worker.records import InRecord


@pytest.fixture
def topics(kafka: Service) -> Topics:
    return Topics(kafka.address, partitions=2).create()


def _settings(topics: Topics) -> Settings:
    return load_settings(kafka={"bootstrap_servers": topics.bootstrap},
                         worker={"output_topic": topics.output, "dead_letter_topic": topics.dlq},
                         review={"topic": f"{topics.prefix}.review"})


def _record(offset: int, value: bytes = b"x") -> InRecord:
    return InRecord("in", 0, offset, 0, None, value, ())


def _verdict(event_id: str) -> Verdict:
    return Verdict(event_id=event_id, content_sha256="0" * 64, label="real", probability=0.1, scores=[],
                   policy_version="p", model_versions={})


def _acks(acks: queue.SimpleQueue[Ack]) -> list[Ack]:
    out = []
    while not acks.empty():
        out.append(acks.get_nowait())
    return out


def _count(topics: Topics, topic: str, expected: int) -> int:
    """Records on ``topic``: the ``expected`` number, or fewer when they do not come within 10 s (and then
    one more poll shows any extra)."""
    with TopicReader({"bootstrap_servers": topics.bootstrap}, [topic], wait_s=10) as reader:
        return len(list(reader.records(expected, idle_s=10))) + len(reader.poll(timeout_ms=500))


def test_each_record_is_acknowledged_once_after_all_its_messages(topics: Topics) -> None:
    settings = _settings(topics)
    create_topics(topics.bootstrap, {f"{topics.prefix}.review": 1})
    acks: queue.SimpleQueue[Ack] = queue.SimpleQueue()
    producer = KafkaProducer(**producer_config(settings))
    publisher = Publisher(settings, producer, acks)
    try:
        for i in range(20):
            publisher.verdict(_record(i), _verdict(f"e{i}"))
        review = ReviewRequest(event_id="e20", content_sha256="0" * 64, reason="uncertain", label="uncertain",
                               probability=0.5, scores=[], source_topic="in",
                               source_partition=0, source_offset=20)
        publisher.verdict(_record(20), _verdict("e20"), review=review)
        publisher.dead_letter(_record(21), DeadLetter(error_type="bad_event", message="m", stage="parse",
                                                      original_topic="in", original_partition=0,
                                                      original_offset=21, original_timestamp_ms=0))
        publisher.flush(timeout_s=30)
    finally:
        publisher.close(timeout_s=5)
    got = _acks(acks)
    assert sorted(ack.record.offset for ack in got) == list(range(22))
    assert all(ack.error is None for ack in got)
    # What was acknowledged is on the broker: 21 verdicts, one review request, one dead letter.
    assert _count(topics, topics.output, 21) == 21
    assert _count(topics, f"{topics.prefix}.review", 1) == 1
    assert _count(topics, topics.dlq, 1) == 1


def test_a_send_the_producer_refuses_is_acknowledged_once_with_its_error(topics: Topics) -> None:
    settings = _settings(topics)
    acks: queue.SimpleQueue[Ack] = queue.SimpleQueue()
    # A request limit below one verdict's size: kafka-python refuses the record in send() itself.
    producer = KafkaProducer(**(producer_config(settings) | {"max_request_size": 200}))
    publisher = Publisher(settings, producer, acks)
    try:
        publisher.verdict(_record(0), _verdict("e0"))
        publisher.flush(timeout_s=10)
    finally:
        publisher.close(timeout_s=5)
    got = _acks(acks)
    assert [ack.record.offset for ack in got] == [0]
    assert got[0].error is not None


def test_producer_batch_bytes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert producer_config(load_settings())["batch_size"] == 262_144
    monkeypatch.setenv("STREAMGUARD_KAFKA__PRODUCER_BATCH_BYTES", "16384")
    assert producer_config(load_settings())["batch_size"] == 16384
