"""Concurrent checks, judged together by the worker's own `BatchProcessor`.

Each check is a record like one consumed from Kafka; one thread, the only one that touches the
processor, takes what has queued up (up to ``serve.batch_size``, waiting ``serve.batch_wait_ms`` for
company) and runs it through ``process()``, so a check gets exactly the verdict or dead letter the worker
would publish: same parse, fetch, dedupe, decode, detectors, fusion and policy. The sink, instead of a
producer, completes each check's future.

A record whose content another worker is scoring is deferred by the processor, not answered; it is
retried every `_WAITING_RECHECK_S` until that verdict is cached (or the lease wait runs out), as in the
worker. With none deferred, a check left unanswered after ``process()`` would be a bug: it is failed
rather than left to time out.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import structlog

from streamguard.schemas import DeadLetter, ReviewRequest, Verdict
from streamguard.worker.processor import BatchProcessor
from streamguard.worker.publish import Sink
from streamguard.worker.records import InRecord

log = structlog.get_logger(__name__)

Outcome = Verdict | DeadLetter
TOPIC = "http"
_WAITING_RECHECK_S = 0.05
_IDLE_TICK_S = 1.0


class Overloaded(Exception):
    """The queue of checks is full."""


class ReviewUnavailable(Exception):
    """The verdict needs a person but its review request could not be queued: the check is not answered
    as if it had been (the caller retries)."""


class NoOutcome(Exception):
    """The pipeline finished a batch without an outcome for this check (a bug, never expected)."""


class FutureSink:
    """The processor's sink: completes each record's future with its verdict or dead letter.

    ``review``: where a verdict that needs a person sends its review request (`review.topic`), before the
    check is answered: a caller that got its verdict can count on the request being queued."""

    def __init__(self, review: Callable[[ReviewRequest], None] | None = None) -> None:
        self._futures: dict[int, Future[Outcome]] = {}
        self._lock = threading.Lock()
        self._review = review

    def expect(self, record: InRecord) -> Future[Outcome]:
        future: Future[Outcome] = Future()
        with self._lock:
            self._futures[record.offset] = future
        return future

    def verdict(self, record: InRecord, verdict: Verdict, review: ReviewRequest | None = None) -> None:
        if review is not None and self._review is not None:
            try:
                self._review(review)
            except Exception as exc:  # noqa: BLE001 - the broker's errors are many; the check must not hang
                log.error("serve.review_failed", event_id=verdict.event_id, error=f"{type(exc).__name__}: {exc}")
                self.fail(record.offset, ReviewUnavailable(str(exc)))
                return
        self._complete(record, verdict)

    def dead_letter(self, record: InRecord, letter: DeadLetter) -> None:
        self._complete(record, letter)

    def pending(self) -> dict[int, Future[Outcome]]:
        with self._lock:
            return dict(self._futures)

    def forget(self, offset: int) -> None:
        with self._lock:
            self._futures.pop(offset, None)

    def fail(self, offset: int, exc: Exception) -> None:
        with self._lock:
            future = self._futures.pop(offset, None)
        if future is not None:
            _settle(future, exc)

    def _complete(self, record: InRecord, outcome: Outcome) -> None:
        with self._lock:
            future = self._futures.pop(record.offset, None)
        if future is not None:
            _settle(future, outcome)


def _settle(future: Future[Outcome], outcome: Outcome | Exception) -> None:
    try:
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass  # the client gave up (its future was cancelled): nobody is waiting for the answer


@dataclass(frozen=True)
class _Check:
    record: InRecord
    future: Future[Outcome]


class MicroBatcher:
    """Queue of checks in front of one `BatchProcessor`, which only this batcher's thread uses."""

    def __init__(self, make_processor: Callable[[Sink], BatchProcessor], *, batch_size: int, batch_wait_s: float,
                 max_queue: int, tick: Callable[[], None] = lambda: None,
                 observe_batch: Callable[[int], None] = lambda size: None,
                 review: Callable[[ReviewRequest], None] | None = None) -> None:
        """``tick``: called at least every second while the thread is healthy (liveness);
        ``observe_batch``: the size of each batch judged; ``review``: queues a review request (`FutureSink`)."""
        self._sink = FutureSink(review)
        self._processor = make_processor(self._sink)
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_s
        self._queue: queue.Queue[_Check | None] = queue.Queue(maxsize=max_queue)
        self._offsets = itertools.count()
        self._tick = tick
        self._observe_batch = observe_batch
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-batcher", daemon=True)

    def start(self) -> MicroBatcher:
        self._thread.start()
        return self

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, value: bytes, headers: list[tuple[str, bytes]], key: bytes | None) -> Future[Outcome]:
        """Queue one event record; its future completes with the verdict or dead letter.
        Cancelling the future (a client that gave up) drops the check if it was not judged yet."""
        if self._stopping.is_set():
            raise Overloaded("stopping")
        record = InRecord(TOPIC, 0, next(self._offsets), int(time.time() * 1000), key, value, tuple(headers))
        future = self._sink.expect(record)
        try:
            self._queue.put_nowait(_Check(record, future))
        except queue.Full:
            self._sink.fail(record.offset, Overloaded("queue full"))
            raise Overloaded(f"{self._queue.maxsize} checks already queued") from None
        return future

    def close(self, timeout_s: float) -> None:
        """Judge what is queued (within ``timeout_s``), then stop."""
        self._stopping.set()
        try:
            self._queue.put(None, timeout=timeout_s)  # a wake-up; waits for room, which the thread makes
        except queue.Full:
            pass
        self._thread.join(timeout=timeout_s)
        for offset in self._sink.pending():
            self._sink.fail(offset, Overloaded("stopping"))
        self._processor.close()

    # -- the batcher's thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        # Checks handed to the processor and not answered yet: deferred ones wait here between passes.
        inflight: dict[int, Future[Outcome]] = {}
        while True:
            deferred = self._processor.waiting > 0
            batch, stop = self._collect(_WAITING_RECHECK_S if deferred else _IDLE_TICK_S)
            self._tick()
            live = []
            for check in batch:
                if check.future.cancelled():
                    self._sink.forget(check.record.offset)
                else:
                    live.append(check)
                    inflight[check.record.offset] = check.future
            if live or deferred:
                self._process([check.record for check in live])
            # Deferred checks whose clients gave up are forgotten, not retried for nobody; on stop, all are.
            self._processor.drop_waiting(lambda record: stop or _gave_up(inflight.get(record.offset)))
            for offset in [offset for offset, future in inflight.items() if future.done()]:
                del inflight[offset]
                self._sink.forget(offset)  # answered, or cancelled and dropped
            if self._processor.waiting == 0:
                for offset in inflight:
                    self._sink.fail(offset, Overloaded("stopping") if stop else NoOutcome("the pipeline gave "
                                                                                           "no outcome"))
                inflight.clear()
            if stop:
                return

    def _collect(self, idle_s: float) -> tuple[list[_Check], bool]:
        """The next batch: block up to ``idle_s`` for a first check, then ``batch_wait_s`` for more."""
        try:
            first = self._queue.get(timeout=idle_s)
        except queue.Empty:
            return [], self._stopping.is_set()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self._batch_wait_s
        while len(batch) < self._batch_size:
            try:
                check = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if check is None:
                return batch, True
            batch.append(check)
        return batch, False

    def _process(self, records: list[InRecord]) -> None:
        if records:
            self._observe_batch(len(records))
        try:
            self._processor.process(records)
        except Exception as exc:  # noqa: BLE001 - process() guards each record; this is a bug, not input
            log.exception("serve.batch_failed", checks=len(records))
            for record in records:
                self._sink.fail(record.offset, NoOutcome(f"{type(exc).__name__}: {exc}"))


def _gave_up(future: Future[Outcome] | None) -> bool:
    """None: already forgotten, after its client cancelled."""
    return future is None or future.cancelled()
