"""Where judged content comes from, in chunks: a verdicts topic joined with its events, or image files
compared with the dedupe cache (a bank's entries: `streamguard.rescore.banked`).

A source yields `Chunk`s in a fixed order, each with the cursor positions just past it; the run commits
those positions once the chunk's verdicts are out. Every record or file read becomes a `Candidate` or a
skip reason, so a run accounts for all of its range.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import hashlib
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from kafka import KafkaConsumer, TopicPartition
from pydantic import ValidationError

from streamguard.dedupe.phash import PerceptualHash
from streamguard.fetch import ImageFetcher, event_bytes
from streamguard.rescore.events import EventImages
from streamguard.rescore.files import DataItem, DataReader, DataUnreadable, item_name
from streamguard.rescore.previous import PreviousVerdicts
from streamguard.schemas import Verdict
from streamguard.streamio import ClientConfig

log = structlog.get_logger(__name__)

FILES_CURSOR = "files"
ENTRIES_CURSOR = "entries"
_POLL_MS = 200


@dataclass(frozen=True)
class Banked:
    """Where banked content's image came from, for the person who settles a disagreement."""

    uri: str | None  # the bank entry's source
    path: str | None  # a local file matched to the bank (``--data`` with ``--bank``)
    pdq: PerceptualHash | None  # the banked one when there is one, so the decision banks the same hash


@dataclass(frozen=True)
class Candidate:
    """One earlier judgement to check: the verdict it got, and the bytes that were judged. A bank's label
    is a verdict with ``decided_by`` "bank" and ``banked`` set."""

    previous: Verdict
    data: bytes
    banked: Banked | None = None


@dataclass
class Chunk:
    candidates: list[Candidate]
    cursors: dict[str, int]  # cursor -> next position once this chunk is done
    read: int  # records or files consumed, candidates and skips alike
    skipped: Counter[str] = field(default_factory=Counter)


class SourceStalled(Exception):
    """The source stopped answering before the end of its range."""


class TopicSource:
    """Verdicts of a topic range, each joined with its event's image from the events topic."""

    def __init__(self, config: ClientConfig, topic: str, cursors: dict[str, list[int]], events: EventImages,
                 fetcher: ImageFetcher, idle_timeout_s: float = 30.0) -> None:
        self._ends = {int(p): end for p, (_, end) in cursors.items()}
        self._next = {int(p): next_ for p, (next_, _) in cursors.items()}
        self._events = events
        self._fetcher = fetcher
        self._topic = topic
        self._idle_timeout_s = idle_timeout_s
        self._consumer = KafkaConsumer(**config, enable_auto_commit=False)
        self._open = {TopicPartition(topic, p) for p in self._ends if self._next[p] < self._ends[p]}
        self._consumer.assign(sorted(self._open))
        for tp in self._open:
            self._consumer.seek(tp, self._next[tp.partition])
        self._buffer: deque[Any] = deque()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rescore-fetch")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._consumer.close()
        self._events.close()
        self._fetcher.close()

    def chunks(self, size: int, limit: int | None) -> Iterator[Chunk]:
        left = limit
        while left is None or left > 0:
            n = size if left is None else min(size, left)
            records = self._take(n)
            if not records:
                # Every partition is read to its end: one last, empty chunk moves the cursors of those whose
                # last offsets hold no record (compacted, transaction markers) to the end too.
                yield self._join([])
                return
            chunk = self._join(records)
            if left is not None:
                left -= chunk.read
            yield chunk

    def _take(self, n: int) -> list[Any]:
        quiet_since = time.monotonic()
        while len(self._buffer) < n and self._open:
            polled = self._consumer.poll(timeout_ms=_POLL_MS)
            for tp, records in polled.items():
                kept = [r for r in records if r.offset < self._ends[tp.partition]]
                self._buffer.extend(kept)
                if kept:
                    quiet_since = time.monotonic()
            done = {tp for tp in self._open if self._consumer.position(tp) >= self._ends[tp.partition]}
            if done:
                self._consumer.pause(*done)
                self._open -= done
            if self._open and time.monotonic() - quiet_since > self._idle_timeout_s:
                raise SourceStalled(f"no verdicts for {self._idle_timeout_s:g}s before the end of the range")
        return [self._buffer.popleft() for _ in range(min(n, len(self._buffer)))]

    def _join(self, records: list[Any]) -> Chunk:
        chunk = Chunk(candidates=[], cursors={}, read=len(records))
        for record in records:
            chunk.cursors[str(record.partition)] = record.offset + 1
        # A partition read to its end (its last records compacted away, say) is finished once nothing of it
        # is left in the buffer.
        buffered = {r.partition for r in self._buffer}
        for p, end in self._ends.items():
            if TopicPartition(self._topic, p) not in self._open and p not in buffered:
                chunk.cursors[str(p)] = end
        verdicts = [v for v in (self._verdict(r, chunk.skipped) for r in records) if v is not None]
        events = self._events.find({v.event_id for v in verdicts})
        todo = []
        for verdict in verdicts:
            event = events.get(verdict.event_id)
            if event is None:
                chunk.skipped["no_event"] += 1
                log.warning("rescore.no_event", event_id=verdict.event_id)
                continue
            todo.append((verdict, self._pool.submit(event_bytes, event, self._fetcher)))
        for verdict, future in todo:
            try:
                data = future.result()
            except Exception as exc:  # noqa: BLE001 - an unreachable URI is one skip, not the end of the run
                chunk.skipped["fetch_failed"] += 1
                log.warning("rescore.fetch_failed", event_id=verdict.event_id, error=f"{type(exc).__name__}: {exc}")
                continue
            if hashlib.sha256(data).hexdigest() != verdict.content_sha256:
                # The URI serves other bytes now, or the id was reused: not the content that was judged.
                chunk.skipped["content_changed"] += 1
                log.warning("rescore.content_changed", event_id=verdict.event_id)
                continue
            chunk.candidates.append(Candidate(verdict, data))
        return chunk

    @staticmethod
    def _verdict(record: Any, skipped: Counter[str]) -> Verdict | None:
        kind = dict(record.headers or ()).get("sg-record")
        if kind is not None and kind != b"verdict":
            skipped["not_a_verdict"] += 1
            return None
        try:
            verdict = Verdict.model_validate_json(record.value or b"")
        except (ValidationError, ValueError):
            skipped["not_a_verdict"] += 1
            return None
        if getattr(verdict, "decided_by", "model") != "model":
            # A bank match or a person decided it: no model upgrade overrides that.
            skipped["not_model_decided"] += 1
            return None
        return verdict


class FileSource(ABC):
    """Image files in a fixed (sorted) order, one of each content per chunk; what each is compared with is
    the subclass's (`_fill`)."""

    def __init__(self, items: Sequence[DataItem], cursor: list[int]) -> None:
        self._items = items
        self._next, self._end = cursor
        self._reader = DataReader()

    def close(self) -> None:
        self._reader.close()

    def chunks(self, size: int, limit: int | None) -> Iterator[Chunk]:
        stop = self._end if limit is None else min(self._end, self._next + limit)
        while self._next < stop:
            batch = self._items[self._next:min(stop, self._next + size)]
            self._next += len(batch)
            chunk = Chunk(candidates=[], cursors={FILES_CURSOR: self._next}, read=len(batch))
            self._fill(chunk, self._read(batch, chunk))
            yield chunk

    def _read(self, items: Sequence[DataItem], chunk: Chunk) -> dict[str, tuple[DataItem, bytes]]:
        """SHA-256 -> the first readable item of that content and its bytes."""
        files: dict[str, tuple[DataItem, bytes]] = {}
        for item in items:
            try:
                data = self._reader.read(item)
            except DataUnreadable as exc:
                chunk.skipped["unreadable_file"] += 1
                log.warning("rescore.unreadable_file", path=item_name(item), error=str(exc))
                continue
            sha = hashlib.sha256(data).hexdigest()
            if sha in files:
                chunk.skipped["copy"] += 1  # one file of each content answers for its cached verdicts
                continue
            files[sha] = (item, data)
        return files

    @abstractmethod
    def _fill(self, chunk: Chunk, files: dict[str, tuple[DataItem, bytes]]) -> None:
        """Add to ``chunk`` what each content's source says of it (its old verdicts, or its bank entry)."""


class DatasetSource(FileSource):
    """Image files, each compared with its cached verdicts."""

    def __init__(self, items: Sequence[DataItem], cursor: list[int], previous: PreviousVerdicts) -> None:
        super().__init__(items, cursor)
        self._previous = previous

    def _fill(self, chunk: Chunk, files: dict[str, tuple[DataItem, bytes]]) -> None:
        found = self._previous.latest(sorted(files))
        for sha, (_, data) in files.items():
            verdicts = found.get(sha)
            if not verdicts:
                chunk.skipped["not_judged"] += 1  # no event was ever judged on it: nothing to correct
                continue
            chunk.candidates.extend(Candidate(verdict, data) for verdict in verdicts)


class Source(Protocol):
    def chunks(self, size: int, limit: int | None) -> Iterator[Chunk]: ...

    def close(self) -> None: ...
