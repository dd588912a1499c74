"""The re-score loop: chunk -> judge -> deliver (publish what changed, refresh the cache) -> checkpoint.

At-least-once, like the worker: a chunk's cursors are checkpointed only after its changed verdicts were
acknowledged by the broker and the dedupe cache holds the new judgements (a bank audit sends review
requests instead: `streamguard.rescore.audit`). A run stopped anywhere (killed, Triton down, Redis down, a
failed send) therefore redoes at most its current chunk, never skips one; publishing the same changed
verdict twice is the price, bounded by one chunk.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from kafka import KafkaProducer

from streamguard.config import Settings
from streamguard.dedupe.store import DedupeStore
from streamguard.rescore.judge import Judged, Rescorer
from streamguard.rescore.sources import Source
from streamguard.rescore.state import RunState, StateFile
from streamguard.schemas import Verdict
from streamguard.streamio import Failed, Message, send_all
from streamguard.worker.publish import producer_config, verdict_message

log = structlog.get_logger(__name__)

RESCORED_HEADER = "sg-rescored-from"


class PublishFailed(Exception):
    """The broker did not acknowledge a changed verdict: the chunk is not checkpointed."""


class CacheUnavailable(Exception):
    """The dedupe cache did not take the new judgements: the chunk is not checkpointed."""


class VerdictPublisher:
    """Changed verdicts onto the verdicts topic, as the worker publishes them, plus a header naming the
    label they replace."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._settings = settings
        self._topic = topic
        self._producer = KafkaProducer(**producer_config(settings))

    def publish(self, verdicts: Sequence[Verdict]) -> None:
        """Returns once every verdict is acknowledged; raises `PublishFailed` otherwise."""
        messages: list[Message] = []
        for verdict in verdicts:
            message = verdict_message(self._settings.worker, verdict)
            previous = verdict.rescored_from.label if verdict.rescored_from is not None else ""
            messages.append((verdict.event_id, message.value, [*message.headers, (RESCORED_HEADER, previous.encode())]))
        send_acknowledged(self._producer, self._topic, messages)

    def close(self) -> None:
        self._producer.close()


def send_acknowledged(producer: KafkaProducer, topic: str, messages: Sequence[Message]) -> None:
    failed = [r for r in send_all(producer, topic, list(messages)) if isinstance(r, Failed)]
    if failed:
        raise PublishFailed(f"{len(failed)} of {len(messages)} records not acknowledged: {failed[0].error}")


class Outlet(Protocol):
    def deliver(self, judged: Sequence[Judged]) -> tuple[list[Judged], Counter[str]]:
        """Acts on a chunk's judgements before it is checkpointed; returns those worth reporting (each goes
        to ``on_change``) and the counts. Raises when what it sends is not acknowledged."""
        ...


class VerdictOutlet:
    """Changed verdicts out, and every new judgement into the dedupe cache. ``publisher`` None: a dry run,
    which publishes and caches nothing."""

    def __init__(self, publisher: VerdictPublisher | None, dedupe: DedupeStore) -> None:
        self._publisher = publisher
        self._dedupe = dedupe

    def deliver(self, judged: Sequence[Judged]) -> tuple[list[Judged], Counter[str]]:
        changed = [j for j in judged if j.changed]
        if self._publisher is not None:
            self._publisher.publish([j.rescored() for j in changed])
            self._refresh(judged)
        return changed, Counter({"changed": len(changed), "unchanged": len(judged) - len(changed)})

    def _refresh(self, judged: Sequence[Judged]) -> None:
        """The next copy of each content gets its new verdict from the cache, not the one it replaced.

        The store fails soft (its errors become "no dedupe" answers); a re-score must not, or the chunk
        would be checkpointed with the cache still answering the old label."""
        stats = self._dedupe.stats
        before = (stats.errors, stats.degraded_calls)
        for j in judged:
            self._dedupe.put(j.current.content_sha256, j.dedupe_key, j.current, j.phash)
        if (stats.errors, stats.degraded_calls) != before:
            raise CacheUnavailable("the dedupe cache did not take the new verdicts")


@dataclass
class Summary:
    counts: Counter[str] = field(default_factory=Counter)  # this invocation
    done: bool = False


class Rescore:
    def __init__(self, source: Source, rescorer: Rescorer, outlet: Outlet, state: RunState,
                 state_file: StateFile | None,
                 on_chunk: Callable[[int], None] = lambda advanced: None,
                 on_change: Callable[[Judged], None] = lambda judged: None) -> None:
        """``state_file`` None: a dry run, which checkpoints nothing. ``on_chunk`` gets how far the cursors
        moved (the progress bar's unit: offsets, files or bank entry ids)."""
        self._source = source
        self._rescorer = rescorer
        self._outlet = outlet
        self._state = state
        self._state_file = state_file
        self._on_chunk = on_chunk
        self._on_change = on_change

    def run(self, chunk_size: int, max_records: int | None) -> Summary:
        summary = Summary()
        for chunk in self._source.chunks(chunk_size, max_records):
            judged, problems = self._rescorer.judge(chunk.candidates)
            noted, outcome = self._outlet.deliver(judged)
            counts = Counter({"read": chunk.read, "judged": len(judged)})
            counts.update(outcome)
            counts.update(chunk.skipped)
            counts.update(problems)
            advanced = 0
            for name, next_ in chunk.cursors.items():
                advanced += max(0, next_ - self._state.cursors[name][0])
                self._state.cursors[name][0] = max(self._state.cursors[name][0], next_)
            self._state.add_counts(counts)
            if self._state_file is not None:
                self._state_file.save(self._state)
            summary.counts.update(counts)
            log.info("rescore.checkpoint", cursors=dict(chunk.cursors), read=chunk.read, noted=len(noted))
            for j in noted:
                self._on_change(j)
            self._on_chunk(advanced)
        summary.done = self._state.done
        return summary
