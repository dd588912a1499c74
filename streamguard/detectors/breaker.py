"""A circuit breaker: stop calling what keeps failing, and try it again after a pause."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> one trial call after ``reset_s``."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._opened_at is not None and self._clock() - self._opened_at < self._reset_s

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if self._clock() - self._opened_at >= self._reset_s:
                self._opened_at = self._clock()  # half-open: this one call is the trial
                return True
            return False

    def record(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._consecutive = 0
                self._opened_at = None
                return
            self._consecutive += 1
            if self._consecutive >= self._threshold:
                self._opened_at = self._clock()
