"""What a re-score covers, as asked for: its identity (which state file is its own) and its first cursors.

Three kinds: a verdicts topic range (`TopicJob`), a set of image files (`DataJob`) and a bank audit
(`BankJob`). The identity leaves
out what only bounds one invocation (``--max-records``, the chunk size), so running the same command again
carries on where the last one stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer

from streamguard.banks import BankStore
from streamguard.rescore.files import DataItem, items_digest
from streamguard.rescore.ranges import RangeError, RangeRequest, resolve
from streamguard.rescore.sources import ENTRIES_CURSOR, FILES_CURSOR
from streamguard.streamio import ClientConfig, topic_partitions


@dataclass(frozen=True)
class TopicJob:
    topic: str
    events_topic: str
    output_topic: str
    request: RangeRequest
    events_since_ms: int | None = None

    def identity(self) -> dict[str, Any]:
        return {"kind": "topic", "topic": self.topic, "events_topic": self.events_topic,
                "output_topic": self.output_topic, "range": self.request.describe(),
                "events_since_ms": self.events_since_ms}

    def first_cursors(self, config: ClientConfig) -> dict[str, list[int]]:
        """Partition -> ``[start, end]``, resolved against the topic now."""
        consumer = KafkaConsumer(**config, enable_auto_commit=False)
        try:
            try:
                partitions = topic_partitions(consumer, self.topic, wait_s=5.0)
            except TimeoutError:
                raise RangeError(f"no topic {self.topic!r}") from None
            ranges = resolve(consumer, partitions, self.request)
        finally:
            consumer.close()
        return {str(p): [start, end] for p, (start, end) in sorted(ranges.items())}


@dataclass(frozen=True)
class DataJob:
    paths: Sequence[DataItem]  # in the order they are re-scored
    output_topic: str
    previous_versions: Sequence[str] = ()  # empty: every versions key found in the cache

    def identity(self) -> dict[str, Any]:
        return {"kind": "data", "files": len(self.paths), "files_digest": items_digest(self.paths),
                "output_topic": self.output_topic, "previous_versions": sorted(self.previous_versions)}

    def first_cursors(self) -> dict[str, list[int]]:
        return {FILES_CURSOR: [0, len(self.paths)]}


@dataclass(frozen=True)
class BankJob:
    bank: str
    review_topic: str
    tenant: str  # whose policy decides the models' label
    files: Sequence[DataItem] = ()  # local images matched to the bank; empty: each entry's own source
    include_uncertain: bool = False

    def identity(self) -> dict[str, Any]:
        return {"kind": "bank", "bank": self.bank, "review_topic": self.review_topic, "tenant": self.tenant,
                "include_uncertain": self.include_uncertain, "files": len(self.files),
                "files_digest": items_digest(self.files) if self.files else None}

    def first_cursors(self, store: BankStore) -> dict[str, list[int]]:
        """Entries added after the run started are left to the next run: the range is fixed here."""
        if self.files:
            return {FILES_CURSOR: [0, len(self.files)]}
        return {ENTRIES_CURSOR: [0, store.written()]}
