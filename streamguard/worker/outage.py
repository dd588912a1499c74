"""Holding the stream while a detector's server is away.

When a detector's backend is unavailable (Triton down or restarting), publishing error scores would turn
an infrastructure outage into thousands of "uncertain" verdicts that dedupe then caches. Instead the
processing thread holds the batch it has and waits here; the poll loop sees `active` and pauses every
partition (the consumer keeps its group membership by polling), readiness turns false, and nothing new is
committed, because nothing held was published. When the probe says the backend is back, the batch is
retried and consumption resumes. A SIGTERM during the wait abandons the held batch: uncommitted, it is
redelivered to whoever owns the partition next.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from streamguard.worker.metrics import WorkerMetrics

log = structlog.get_logger(__name__)


class OutageGate:
    def __init__(self, stop: threading.Event, metrics: WorkerMetrics, check_s: float) -> None:
        self._stop = stop
        self._metrics = metrics
        self._check_s = check_s
        self._reason: str | None = None
        self._since: float | None = None

    @property
    def active(self) -> str | None:
        """Why the stream is held, or None."""
        return self._reason

    @property
    def abandoning(self) -> bool:
        """Stopping during an outage: held work is given up at once, not retried against a dead server."""
        return self._reason is not None and self._stop.is_set()

    @property
    def seconds(self) -> float:
        return 0.0 if self._since is None else time.monotonic() - self._since

    def hold(self, reason: str, recovered: Callable[[], bool]) -> bool:
        """Block until ``recovered()`` (True) or the worker stops (False)."""
        first = self._reason is None
        self._reason = reason
        if first:
            self._since = time.monotonic()
            self._metrics.outage.set(1)
            log.warning("worker.outage_started", reason=reason[:300])
        while not self._stop.is_set():
            if recovered():
                return True
            self._stop.wait(self._check_s)
        log.warning("worker.outage_abandoned", reason=reason[:300], seconds=round(self.seconds, 1))
        return False

    def clear(self) -> None:
        """The held work went through: the outage is over."""
        if self._reason is None:
            return
        log.info("worker.outage_ended", seconds=round(self.seconds, 1))
        self._metrics.outages.inc()
        self._metrics.outage_seconds.inc(self.seconds)
        self._metrics.outage.set(0)
        self._reason = None
        self._since = None
