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
