"""A consumed record, detached from kafka-python's types, tagged with its assignment epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition


@dataclass(frozen=True)
class InRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    # Bumped on every revoke/assign of the partition: work from an older epoch is not committed.
    epoch: int = 0
    # Set when the client could not read the record at all: why. Only topic, partition and offset are real.
    unreadable: str | None = None

    @property
    def header_bytes(self) -> int:
        return sum(len(name.encode("utf-8", "replace")) + len(value) for name, value in self.headers)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @classmethod
    def from_consumer(cls, record: Any, epoch: int) -> InRecord:
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            key=record.key,
            value=record.value,
            headers=tuple((name, value or b"") for name, value in (record.headers or ())),
            epoch=epoch,
        )

    @classmethod
    def unreadable_at(cls, tp: TopicPartition, offset: int, epoch: int, reason: str) -> InRecord:
        return cls(topic=tp.topic, partition=tp.partition, offset=offset, timestamp_ms=-1, key=None, value=None,
                   headers=(), epoch=epoch, unreadable=reason)
