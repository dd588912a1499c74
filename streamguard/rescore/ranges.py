"""Which offsets of a topic a re-score covers: per partition ``[start, end)``, fixed when a run starts.

A range is resolved once and kept in the run's state, so a resumed run ends where the first one meant to
end, not at whatever the topic holds by then (the re-score's own verdicts land on the same topic).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from kafka import KafkaConsumer, TopicPartition

# How long a partition must stay silent past its reported end before that end is believed.
_END_PROBE_IDLE_S = 0.5
_END_PROBE_MAX_S = 10.0


class RangeError(ValueError):
    """A range argument that cannot be read or does not fit the topic."""


@dataclass(frozen=True)
class OffsetSpec:
    """``--from-offset``/``--to-offset``: ``N`` for every partition, ``P:N`` for partition P (wins)."""

    every: int | None
    per_partition: Mapping[int, int]

    def for_partition(self, partition: int) -> int | None:
        return self.per_partition.get(partition, self.every)


def parse_offsets(values: Iterable[str]) -> OffsetSpec:
    every: int | None = None
    per: dict[int, int] = {}
    for value in values:
        part, sep, offset = value.partition(":")
        try:
            if sep:
                per[int(part)] = int(offset)
            else:
                every = int(part)
        except ValueError:
            raise RangeError(f"not an offset: {value!r} (expected N or PARTITION:N)") from None
    if any(o < 0 for o in per.values()) or (every is not None and every < 0):
        raise RangeError("offsets cannot be negative")
    return OffsetSpec(every, per)


def parse_time(value: str) -> int:
    """Epoch milliseconds from ISO 8601 (naive means UTC) or a bare number of epoch milliseconds."""
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise RangeError(f"not a time: {value!r} (ISO 8601 or epoch milliseconds)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class RangeRequest:
    """What the operator asked for; resolved against the topic by `resolve`."""

    start: OffsetSpec = OffsetSpec(None, {})
    end: OffsetSpec = OffsetSpec(None, {})
    since_ms: int | None = None
    until_ms: int | None = None

    def describe(self) -> dict[str, object]:
        """A stable description, part of the run's identity."""
        return {"from": [self.start.every, sorted(self.start.per_partition.items())],
                "to": [self.end.every, sorted(self.end.per_partition.items())],
                "since_ms": self.since_ms, "until_ms": self.until_ms}


def resolve(consumer: KafkaConsumer, partitions: Sequence[TopicPartition],
            request: RangeRequest) -> dict[int, tuple[int, int]]:
    """Partition -> ``(start, end)`` offsets, clamped to what the topic holds now. A time bound and an
    offset bound on the same side: the narrower wins."""
    first = consumer.beginning_offsets(list(partitions))
    last = readable_ends(consumer, partitions)
    since = offsets_at(consumer, partitions, request.since_ms, last)
    until = offsets_at(consumer, partitions, request.until_ms, last)
    out: dict[int, tuple[int, int]] = {}
    for tp in partitions:
        lo, hi = first[tp], last[tp]
        start = max(lo, _or(request.start.for_partition(tp.partition), lo), since.get(tp, lo))
        end = min(hi, _or(request.end.for_partition(tp.partition), hi), until.get(tp, hi))
        out[tp.partition] = (start, max(start, end))
    unknown = (set(request.start.per_partition) | set(request.end.per_partition)) - {tp.partition for tp in partitions}
    if unknown:
        raise RangeError(f"no partition {sorted(unknown)} in the topic (it has {len(partitions)})")
    return out


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def offsets_at(consumer: KafkaConsumer, partitions: Sequence[TopicPartition], at_ms: int | None,
               ends: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
    """The first offset at or after ``at_ms`` per partition (its end when nothing is that recent)."""
    if at_ms is None:
        return {}
    found = consumer.offsets_for_times({tp: at_ms for tp in partitions})
    out = {}
    for tp in partitions:
        hit = found.get(tp)
        # Kafka answers "none that recent" with no entry; Tansu with offset 0 and timestamp -1.
        out[tp] = ends[tp] if hit is None or hit.offset < 0 or hit.timestamp < 0 else hit.offset
    return out


def readable_ends(consumer: KafkaConsumer, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
    """Each partition's end: one past the last record readable now.

    Not just ``end_offsets``: Tansu answers ListOffsets below the true end of a partition whose last batch
    holds several records (bench/bench_worker.py), which would leave the newest verdicts out of a range.
    So the consumer reads on from the reported end until the partitions go quiet. Against Kafka this
    reads nothing and costs one idle wait. The consumer's assignment is replaced."""
    reported = consumer.end_offsets(list(partitions))
    ends = dict(reported)
    consumer.assign(list(partitions))
    for tp in partitions:
        consumer.seek(tp, reported[tp])
    deadline = time.monotonic() + _END_PROBE_MAX_S
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < _END_PROBE_IDLE_S and time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=100)
        for tp, records in polled.items():
            if records:
                ends[tp] = max(ends[tp], records[-1].offset + 1)
                quiet_since = time.monotonic()
    return ends
