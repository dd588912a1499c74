"""The image events behind published verdicts, found by event id on the events topic.

A verdict carries its event's id and content hash but not the image, so re-judging it needs the original
event. The events topic is read forward once, in step with the verdicts (an event is published before its
verdict, so the events a chunk of verdicts needs are mostly just ahead): every event read is indexed by id
with its position, and kept in memory up to a byte budget. An event needed after it left the buffer is
read again from its position, one seek.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

import structlog
from kafka import KafkaConsumer, TopicPartition

from streamguard.rescore.ranges import RangeError, offsets_at, readable_ends
from streamguard.schemas import ImageEvent
from streamguard.streamio import ClientConfig, topic_partitions
from streamguard.wire import parse_event

log = structlog.get_logger(__name__)

_POLL_MS = 200


class EventsUnavailable(Exception):
    """The events topic stopped answering before its end: the chunk cannot be joined now."""


class EventImages:
    def __init__(self, config: ClientConfig, topic: str, since_ms: int | None = None,
                 buffer_bytes: int = 256 * 1024 * 1024, idle_timeout_s: float = 30.0,
                 max_record_bytes: int = 26 * 1024 * 1024) -> None:
        """``since_ms``: read events from this time on (None: from the beginning of the topic)."""
        self._config = {**config, "enable_auto_commit": False,
                        "max_partition_fetch_bytes": max_record_bytes, "fetch_max_bytes": max(52_428_800, max_record_bytes)}
        self._topic = topic
        self._scan = KafkaConsumer(**self._config)
        self._reread: KafkaConsumer | None = None
        self._buffer: OrderedDict[str, ImageEvent] = OrderedDict()
        self._buffered_bytes = 0
        self._buffer_limit = buffer_bytes
        self._positions: dict[str, tuple[TopicPartition, int]] = {}
        self._idle_timeout_s = idle_timeout_s
        self.unreadable = 0
        try:
            partitions = topic_partitions(self._scan, topic, wait_s=5.0)
        except TimeoutError:
            self._scan.close()
            raise RangeError(f"no events topic {topic!r}") from None
        # Events published after the run started cannot be behind verdicts inside its range.
        self._ends = readable_ends(self._scan, partitions)
        starts = self._scan.beginning_offsets(partitions)
        starts.update(offsets_at(self._scan, partitions, since_ms, self._ends))
        for tp in partitions:
            self._scan.seek(tp, starts[tp])
        self._open = {tp for tp in partitions if starts[tp] < self._ends[tp]}
        if finished := set(partitions) - self._open:
            self._scan.pause(*finished)

    def close(self) -> None:
        self._scan.close()
        if self._reread is not None:
            self._reread.close()

    def find(self, event_ids: Iterable[str]) -> dict[str, ImageEvent]:
        """The events of these ids that the topic holds (the first copy of each id)."""
        wanted = set(event_ids)
        found: dict[str, ImageEvent] = {}
        for event_id in list(wanted):
            event = self._known(event_id)
            if event is not None:
                found[event_id] = event
                wanted.discard(event_id)
        quiet_since = time.monotonic()
        while wanted and self._open:
            polled = self._scan.poll(timeout_ms=_POLL_MS)
            for tp, records in polled.items():
                for record in records:
                    if record.offset >= self._ends[tp]:
                        continue
                    quiet_since = time.monotonic()
                    event = self._index(tp, record)
                    if event is not None and event.event_id in wanted:
                        found[event.event_id] = event
                        wanted.discard(event.event_id)
            self._close_finished()
            if self._open and time.monotonic() - quiet_since > self._idle_timeout_s:
                raise EventsUnavailable(f"no events from {self._topic} for {self._idle_timeout_s:g}s before its end")
        return found

    def _close_finished(self) -> None:
        done = {tp for tp in self._open if self._scan.position(tp) >= self._ends[tp]}
        if done:
            self._scan.pause(*done)
            self._open -= done

    def _known(self, event_id: str) -> ImageEvent | None:
        event = self._buffer.get(event_id)
        if event is not None:
            self._buffer.move_to_end(event_id)
            return event
        where = self._positions.get(event_id)
        return None if where is None else self._read_at(*where)

    def _index(self, tp: TopicPartition, record: object) -> ImageEvent | None:
        try:
            event = parse_event(record.value, list(record.headers or ())).event  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a record the worker dead-lettered has no verdict to re-judge
            self.unreadable += 1
            return None
        if event.event_id in self._positions:
            return event  # a re-sent event: the first copy is the one indexed
        self._positions[event.event_id] = (tp, record.offset)  # type: ignore[attr-defined]
        self._keep(event)
        return event

    def _keep(self, event: ImageEvent) -> None:
        self._buffer[event.event_id] = event
        self._buffered_bytes += len(event.image or b"")
        while self._buffered_bytes > self._buffer_limit and len(self._buffer) > 1:
            _, old = self._buffer.popitem(last=False)
            self._buffered_bytes -= len(old.image or b"")

    def _read_at(self, tp: TopicPartition, offset: int) -> ImageEvent | None:
        if self._reread is None:
            self._reread = KafkaConsumer(**self._config)
        self._reread.assign([tp])
        self._reread.seek(tp, offset)
        deadline = time.monotonic() + self._idle_timeout_s
        while time.monotonic() < deadline:
            for record in self._reread.poll(timeout_ms=_POLL_MS).get(tp, []):
                if record.offset == offset:
                    try:
                        return parse_event(record.value, list(record.headers or ())).event
                    except Exception:  # noqa: BLE001 - it was readable when indexed; treat as gone
                        return None
                if record.offset > offset:
                    return None
        raise EventsUnavailable(f"{self._topic}[{tp.partition}]@{offset} could not be read again")
