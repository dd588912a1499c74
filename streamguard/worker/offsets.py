"""Per-partition offset bookkeeping for out-of-order completion (Faust's contiguous-ack commit).

Invariant: the commit point of a partition is the smallest offset still in flight, or one past the
highest offset seen when nothing is in flight. Everything below the commit point has a verdict or a
dead letter acknowledged by the broker, so committing it can never lose a record; records finishing out
of order only hold the commit point back, never push it past unfinished work.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


@dataclass
class _Partition:
    heap: list[int] = field(default_factory=list)  # in-flight offsets; acked ones leave lazily
    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset added
    committed: int | None = None

    def commit_point(self) -> int | None:
        while self.heap and self.heap[0] not in self.pending:
            heapq.heappop(self.heap)
        return self.heap[0] if self.heap else self.next_offset


class OffsetTracker(Generic[P]):
    def __init__(self) -> None:
        self._parts: dict[P, _Partition] = {}

    def add(self, partition: P, offset: int) -> None:
        part = self._parts.setdefault(partition, _Partition())
        part.pending.add(offset)
        heapq.heappush(part.heap, offset)
        part.next_offset = max(part.next_offset or 0, offset + 1)

    def done(self, partition: P, offset: int) -> bool:
        """Mark ``offset`` finished; False when it was not in flight (e.g. its partition was revoked)."""
        part = self._parts.get(partition)
        if part is None or offset not in part.pending:
            return False
        part.pending.discard(offset)
        return True

    def in_flight(self, partition: P | None = None) -> int:
        if partition is not None:
            part = self._parts.get(partition)
            return len(part.pending) if part else 0
        return sum(len(p.pending) for p in self._parts.values())

    def resume_point(self, partition: P) -> int | None:
        """Where consuming must resume for nothing unfinished to be skipped: the smallest offset in
        flight, else one past the highest seen (None: nothing seen)."""
        part = self._parts.get(partition)
        return part.commit_point() if part is not None else None

    def commit_points(self, partitions: set[P] | None = None) -> dict[P, int]:
        """Offsets to commit (the next offset to consume), only where they advanced."""
        out: dict[P, int] = {}
        for tp, part in self._parts.items():
            if partitions is not None and tp not in partitions:
                continue
            point = part.commit_point()
            if point is not None and (part.committed is None or point > part.committed):
                out[tp] = point
        return out

    def mark_committed(self, points: dict[P, int]) -> None:
        for tp, point in points.items():
            part = self._parts.get(tp)
            if part is not None and (part.committed is None or point > part.committed):
                part.committed = point

    def forget(self, partitions: set[P]) -> None:
        """Drop revoked or lost partitions: acks for them arriving later are ignored."""
        for tp in partitions:
            self._parts.pop(tp, None)
