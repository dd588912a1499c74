"""Putting image events on a topic and reading back what came out: the one harness behind
``streamguard produce`` and ``tail``, the stream tests and the worker benchmark.

Every function takes kafka-python client settings as a mapping (``KafkaSettings.client_config()``, or just
``{"bootstrap_servers": ...}``), plus producer options such as ``compression_type`` where it produces, so
its callers differ only in what they pass. Readers join no consumer group: they assign every partition,
start from the beginning and commit nothing, so they never disturb the worker's group.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamguard.schemas import ImageEvent
from streamguard.wire import Encoding, Headers, encode_event

ClientConfig = Mapping[str, Any]
# The event id (also the record key, and how a verdict is matched to its event), the value, the headers.
Message = tuple[str | None, bytes | None, Headers]
DEAD_LETTER_HEADER = "sg-dead-letter"


# -- producing ------------------------------------------------------------------------------------------


def event_message(event: ImageEvent, encoding: Encoding = "binary") -> Message:
    value, headers = encode_event(event, encoding)
    return event.event_id, value, headers


def image_messages(images: Iterable[bytes], encoding: Encoding = "binary", prefix: str = "e") -> list[Message]:
    """One event per image, with ids ``{prefix}-{i}``."""
    return [event_message(ImageEvent(event_id=f"{prefix}-{i}", image=data), encoding)
            for i, data in enumerate(images)]


@dataclass(frozen=True)
class Sent:
    event_id: str | None
    partition: int
    offset: int


@dataclass(frozen=True)
class Failed:
    event_id: str | None
    error: Exception


def send_all(producer: KafkaProducer, topic: str, messages: Iterable[Message],
             timeout_s: float = 30.0) -> list[Sent | Failed]:
    """Send every message, then wait for each acknowledgement: ``flush()`` does not raise for failed sends,
    so each send's outcome is checked on its own. In the order sent."""
    futures = []
    for event_id, value, headers in messages:
        key = event_id.encode() if event_id else None
        futures.append((event_id, producer.send(topic, key=key, value=value, headers=headers)))
    producer.flush()
    results: list[Sent | Failed] = []
    for event_id, future in futures:
        try:
            meta = future.get(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failed send is a result to report, not a crash
            results.append(Failed(event_id, exc))
        else:
            results.append(Sent(event_id, meta.partition, meta.offset))
    return results


def produce(config: ClientConfig, topic: str, messages: Iterable[Message]) -> list[Sent]:
    """Send with a producer of its own; raises the first failed send's error."""
    producer = KafkaProducer(**config)
    try:
        results = send_all(producer, topic, messages)
    finally:
        producer.close()
    for result in results:
        if isinstance(result, Failed):
            raise result.error
    return [r for r in results if isinstance(r, Sent)]


def partition_ends(sent: Iterable[Sent]) -> dict[int, int]:
    """Each partition's end offset after these sends, from their acknowledgements."""
    ends: dict[int, int] = {}
    for s in sent:
        ends[s.partition] = max(ends.get(s.partition, 0), s.offset + 1)
    return ends


# -- reading --------------------------------------------------------------------------------------------


def topic_partitions(consumer: KafkaConsumer, topic: str, wait_s: float = 0.0) -> list[TopicPartition]:
    """The topic's partitions; waits up to ``wait_s`` for metadata of a topic just created (0: a topic
    without metadata has none)."""
    deadline = time.monotonic() + wait_s
    while not (parts := consumer.partitions_for_topic(topic)):
        if time.monotonic() >= deadline:
            if wait_s:
                raise TimeoutError(f"no metadata for {topic} within {wait_s:g}s")
            return []
        time.sleep(0.1)
    return [TopicPartition(topic, p) for p in sorted(parts)]


class TopicReader:
    """Every partition of some topics, from the beginning, without a group."""

    def __init__(self, config: ClientConfig, topics: Sequence[str], wait_s: float = 0.0, **options: Any) -> None:
        self._consumer = KafkaConsumer(**config, enable_auto_commit=False, **options)
        try:
            self.partitions = [tp for topic in topics for tp in topic_partitions(self._consumer, topic, wait_s)]
            self._consumer.assign(self.partitions)
            self._consumer.seek_to_beginning(*self.partitions)
        except BaseException:
            self._consumer.close()
            raise

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self, timeout_ms: int = 200) -> list[Any]:
        return [record for records in self._consumer.poll(timeout_ms=timeout_ms).values() for record in records]

    def records(self, count: int | None = None, idle_s: float = 30.0) -> Iterator[Any]:
        """Records as they come, until ``count`` in all or ``idle_s`` without one."""
        seen, last = 0, time.monotonic()
        while (count is None or seen < count) and time.monotonic() - last < idle_s:
            for record in self.poll():
                yield record
                seen += 1
                last = time.monotonic()
                if count is not None and seen >= count:
                    return

    def to_end(self, timeout_s: float = 30.0) -> list[Any]:
        """Everything up to the end offsets as they are now, or what came within ``timeout_s``.

        Tansu's end offsets can fall short of a partition's true end (see bench/bench_worker.py), so a caller
        that needs every record of a known set reads again until it has them (`wait_for_outcomes`)."""
        ends = self._consumer.end_offsets(self.partitions)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while (any(self._consumer.position(tp) < ends[tp] for tp in self.partitions)
               and time.monotonic() < deadline):
            out += self.poll()
        return out

    def close(self) -> None:
        self._consumer.close()


# -- outcomes: verdicts and dead letters ----------------------------------------------------------------


def decode_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, str]:
    return {name: (value or b"").decode("utf-8", "replace") for name, value in headers or ()}


@dataclass
class Outcomes:
    verdicts: list[dict] = field(default_factory=list)
    # The DeadLetter JSON of the sg-dead-letter header, plus "value_len" and every header as "headers".
    dead_letters: list[dict] = field(default_factory=list)

    def add(self, dead_letter: bool, value: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None) -> None:
        """One record of the output topic (``dead_letter`` False) or the dead-letter topic, from any client."""
        if not dead_letter:
            self.verdicts.append(json.loads(value or b"null"))
            return
        named = decode_headers(headers)
        letter = json.loads(named[DEAD_LETTER_HEADER])
        letter["value_len"] = len(value or b"")
        letter["headers"] = named
        self.dead_letters.append(letter)

    def verdict_ids(self) -> list[str]:
        return [v["event_id"] for v in self.verdicts]

    def dead_positions(self) -> set[tuple[int, int]]:
        return {(d["original_partition"], d["original_offset"]) for d in self.dead_letters}


def read_outcomes(config: ClientConfig, output_topic: str, dead_letter_topic: str,
                  timeout_s: float = 30.0) -> Outcomes:
    outcomes = Outcomes()
    with TopicReader(config, [output_topic, dead_letter_topic]) as reader:
        for record in reader.to_end(timeout_s):
            outcomes.add(record.topic == dead_letter_topic, record.value, record.headers)
    return outcomes


def missing(sent: Iterable[Sent], outcomes: Outcomes) -> list[Sent]:
    """The sends with neither a verdict (by event id) nor a dead letter (by position)."""
    ids, dead = set(outcomes.verdict_ids()), outcomes.dead_positions()
    return [s for s in sent if s.event_id not in ids and (s.partition, s.offset) not in dead]


def wait_for_outcomes(config: ClientConfig, output_topic: str, dead_letter_topic: str, sent: list[Sent],
                      timeout_s: float = 90.0) -> Outcomes:
    """Until every sent record has a verdict or a dead letter; raises AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcomes = read_outcomes(config, output_topic, dead_letter_topic)
        if not missing(sent, outcomes):
            return outcomes
        if time.monotonic() > deadline:
            raise AssertionError(f"missing outcomes for {missing(sent, outcomes)[:10]}")
        time.sleep(0.5)


# -- offsets --------------------------------------------------------------------------------------------


def committed_offsets(config: ClientConfig, group: str, topic: str, wait_s: float = 0.0) -> dict[int, int | None]:
    """The group's committed offset per partition of ``topic`` (None: nothing committed)."""
    consumer = KafkaConsumer(**config, group_id=group, enable_auto_commit=False)
    try:
        return {tp.partition: consumer.committed(tp) for tp in topic_partitions(consumer, topic, wait_s)}
    finally:
        consumer.close()


def end_offsets(config: ClientConfig, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(**config)
    try:
        ends = consumer.end_offsets(topic_partitions(consumer, topic))
    finally:
        consumer.close()
    return {tp.partition: offset for tp, offset in ends.items()}
