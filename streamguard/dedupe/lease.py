"""Keeping in-flight leases alive while their holder scores.

Leases are short so that a killed worker delays other workers' copies of its content only briefly; a live
worker that scores for longer than the lease (a slow batch, a held Triton outage) renews them meanwhile.
"""

from __future__ import annotations

import threading
from types import TracebackType

from streamguard.dedupe.store import DedupeStore


class LeaseKeeper:
    """Renews ``owner``'s leases on ``sha256s`` every ``interval_s`` inside a ``with`` block."""

    def __init__(self, store: DedupeStore, owner: str, sha256s: list[str], interval_s: float) -> None:
        self._store = store
        self._owner = owner
        self._sha256s = sha256s
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKeeper:
        if self._sha256s:
            self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._store.renew(self._sha256s, self._owner)
