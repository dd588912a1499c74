"""The worker's poll loop: the one thread that owns the Kafka consumer.

Threads and what they own:
- the poll loop (this module): the consumer, the offset tracker writes, flow control, commits;
- the processing thread: batches of records through `BatchProcessor` (detectors have their own threads);
- kafka-python's IO threads: producer acknowledgements (only queued here) and rebalance callbacks
  (which take the same lock as the poll loop, and never block on the network).

Delivery is at-least-once: a partition's offset is committed only up to the first record whose verdict
or dead letter the broker has not acknowledged yet (see `offsets.py`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pluggy
import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from streamguard.config import Settings
from streamguard.dedupe import DedupeStore, new_owner_id, open_store
from streamguard.fetch import ImageFetcher
from streamguard.scoring import Scorer
from streamguard.worker.health import HealthServer, HealthState
from streamguard.worker.metrics import WorkerMetrics
from streamguard.worker.offsets import OffsetTracker
from streamguard.worker.outage import OutageGate
from streamguard.worker.processor import BatchProcessor
from streamguard.worker.publish import Ack, Publisher, producer_config
from streamguard.worker.records import InRecord

log = structlog.get_logger(__name__)

_LAG_INTERVAL_S = 5.0
_WAITING_RECHECK_S = 0.05
_PDQ_MIN_SIDE = 128


def consumer_config(settings: Settings) -> dict[str, Any]:
    w = settings.worker
    return settings.kafka.client_config() | {
        "group_id": w.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        # Flow control bounds the work in flight; a poll may bring a partition's whole budget at once.
        "max_poll_records": min(500, w.max_in_flight),
        "max_poll_interval_ms": w.max_poll_interval_ms,
        "session_timeout_ms": w.session_timeout_ms,
        "heartbeat_interval_ms": w.heartbeat_interval_ms,
        "fetch_max_bytes": max(52_428_800, w.max_record_bytes),
        "max_partition_fetch_bytes": w.max_record_bytes + 1024 * 1024,
    }


def build_scorer(settings: Settings, pm: pluggy.PluginManager) -> Scorer:
    """The worker's scorer. `streamguard serve` builds the same one: a different decode size would give
    the same image different scores there."""
    # PDQ works on a 64x64 reduction of a sharp image: a draft decode below ~128 px blurs the hash.
    near = settings.dedupe.enabled and settings.dedupe.near
    return Scorer(settings, pm, min_decode_side=_PDQ_MIN_SIDE if near else None)


class Worker:
    def __init__(self, settings: Settings, pm: pluggy.PluginManager, dedupe: DedupeStore | None = None) -> None:
        self._settings = settings
        self.metrics = WorkerMetrics()
        self.scorer = build_scorer(settings, pm)
        self.dedupe: DedupeStore = dedupe or open_store(settings.dedupe, settings.redis)
        self._fetcher = ImageFetcher(settings.fetch, settings.intake.max_bytes)
        self._acks: queue.SimpleQueue[Ack] = queue.SimpleQueue()
        # What each poll brought, one list per poll (a hand-off per record costs a wake-up each); None: stop.
        self._work: queue.Queue[list[InRecord] | None] = queue.Queue()
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._lock = threading.Lock()  # tracker, epochs: shared with the rebalance callbacks
        self._epochs: dict[TopicPartition, int] = {}
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        # Where each revoked partition's consuming must resume if the next assignment hands it back.
        self._resume: dict[TopicPartition, int] = {}
        self._detector_seen: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._fatal: Exception | None = None
        self.outage = OutageGate(self._stop, self.metrics, settings.worker.outage_check_s)
        self.health = HealthState(liveness_timeout_s=settings.worker.liveness_timeout_s)
        self.health.readiness = self._readiness
        self._consumer: KafkaConsumer | None = None
        self._last_unreadable: tuple[TopicPartition, int, str] | None = None
        # Called with the health server's port once it listens (a supervisor's child reports it so).
        self.on_listening: Callable[[int], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to drain and exit (signal handlers call this)."""
        self._stop.set()

    def run(self) -> int:
        w = self._settings.worker
        self.scorer.start()
        server = HealthServer.from_settings(self.health, self.metrics.render, w).start()
        log.info("worker.health_listening", port=server.port)
        if self.on_listening is not None:
            self.on_listening(server.port)
        producer = KafkaProducer(**producer_config(self._settings))
        publisher = Publisher(self._settings, producer, self._acks)
        processor = BatchProcessor(self._settings, self.scorer, self.dedupe, self._fetcher, publisher,
                                   self.metrics, owner=new_owner_id(), outage=self.outage, is_current=self._is_current)
        consumer = KafkaConsumer(**consumer_config(self._settings))
        self._consumer = consumer
        consumer.subscribe([w.input_topic], listener=_Rebalance(self, consumer))
        processing = threading.Thread(target=self._process_forever, args=(processor,), name="processing",
                                      daemon=True)
        processing.start()
        log.info("worker.started", group=w.group_id, topic=w.input_topic)
        try:
            self._poll_until_stopped(consumer)
            drained = self._drain(consumer)
        finally:
            self._work.put(None)
            processing.join(timeout=5)
            # Acknowledgements that arrived since the last look (or are still on their way) count too:
            # committing without them would redeliver, and judge twice, work the broker already has.
            publisher.flush(timeout_s=5)
            self._drain_acks()
            self._commit(consumer)
            publisher.close(timeout_s=5)
            consumer.close(autocommit=False)
            processor.close()
            self.scorer.close()
            self.dedupe.close()
            self._fetcher.close()
            server.close()
        if self._fatal is not None:
            log.error("worker.stopped_on_error", error=f"{type(self._fatal).__name__}: {self._fatal}")
            return 1
        log.info("worker.stopped", drained=drained)
        return 0

    def _poll_until_stopped(self, consumer: KafkaConsumer) -> None:
        w = self._settings.worker
        last_commit = last_lag = last_poll = time.monotonic()
        while not self._stop.is_set() and self._fatal is None:
            # With every partition paused a poll would only sleep; wait for acknowledgements instead, so
            # capacity frees up (and partitions resume) as soon as the broker confirms.
            assigned = consumer.assignment()
            with self._lock:
                all_paused = bool(self._paused) and self._paused >= assigned
            if all_paused and time.monotonic() - last_poll < w.poll_timeout_ms / 1000.0:
                # Acknowledgements arrive a produce response at a time; a poll after each one costs the
                # processing thread the GIL for kafka-python 3's round trips through its IO thread, and
                # fetches nothing. Polling once per poll_timeout_ms still serves rebalances promptly.
                batch: dict[TopicPartition, list[Any]] = {}
            else:
                batch = self._poll(consumer, timeout_ms=0 if all_paused else w.poll_timeout_ms)
                last_poll = time.monotonic()
            self.health.progress()
            self._accept(batch)
            self._drain_acks(wait_s=w.poll_timeout_ms / 1000.0 if all_paused else 0.0)
            self._flow_control(consumer)
            now = time.monotonic()
            if now - last_commit >= w.commit_interval_s:
                self._commit(consumer)
                last_commit = now
            if now - last_lag >= _LAG_INTERVAL_S:
                self._update_lag(consumer)
                last_lag = now

    def _drain(self, consumer: KafkaConsumer) -> bool:
        """Stop fetching, let in-flight work finish within the budget; poll keeps the membership alive."""
        deadline = time.monotonic() + self._settings.worker.drain_timeout_s
        log.info("worker.draining", in_flight=self._tracker.in_flight())
        while time.monotonic() < deadline and self._fatal is None:
            if self.outage.active:
                # The held batch is abandoned on stop: waiting out the budget would finish nothing.
                log.info("worker.drain_skipped", reason="detector outage", in_flight=self._tracker.in_flight())
                return False
            self._flow_control(consumer)
            # Nothing fetched is taken now: every partition is paused, so this only keeps the membership.
            self._poll(consumer, timeout_ms=50)
            self.health.progress()
            self._drain_acks()
            with self._lock:
                if self._tracker.in_flight() == 0:
                    return True
        return False

    # -- the poll loop's steps ------------------------------------------------------------------------

    def _poll(self, consumer: KafkaConsumer, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        """``consumer.poll``, surviving records the client cannot read.

        kafka-python raises inside ``poll()`` for a record it cannot parse (a header key that is not UTF-8
        is a `CorruptRecordError`), for a batch compressed with a codec it lacks, or for a broken compressed
        payload; the same record would raise again on every poll and on every restart. The record is at
        the partition's position: it becomes a dead letter naming topic, partition and offset, and the
        consumer seeks past it. A batch that cannot be decompressed is skipped one offset at a time, so
        each of its records gets its own dead letter."""
        try:
            return consumer.poll(timeout_ms=timeout_ms)
        except Exception as exc:  # noqa: BLE001 - narrowed below: only an error tied to a record is skipped
            tp = _failed_partition(consumer, exc)
            if tp is None or tp not in consumer.assignment():
                raise
            self._skip_unreadable(consumer, tp, exc)
            return {}

    def _skip_unreadable(self, consumer: KafkaConsumer, tp: TopicPartition, exc: Exception) -> None:
        offset = consumer.position(tp)
        reason = f"{type(exc).__name__}: {exc}"
        if self._last_unreadable == (tp, offset - 1, reason):
            # kafka-python re-reads a batch from its start and cannot step over the bad record: the records
            # after it in the same batch are unreadable to this client too, whatever they hold.
            reason_out = f"after an unreadable record at offset {offset - 1} in the same batch: {reason}"
        else:
            reason_out = reason
        self._last_unreadable = (tp, offset, reason)
        reason = reason_out
        log.warning("worker.unreadable_record", topic=tp.topic, partition=tp.partition, offset=offset, error=reason)
        self.metrics.unreadable_records.inc()
        with self._lock:
            epoch = self._epochs.get(tp, 0)
            self._tracker.add(tp, offset)
            self._positions[tp] = offset + 1
        self.metrics.events_in.inc()
        self._work.put([InRecord.unreadable_at(tp, offset, epoch, reason)])
        consumer.seek(tp, offset + 1)

    def _accept(self, batch: dict[TopicPartition, list[Any]]) -> None:
        accepted: list[InRecord] = []
        for tp, records in batch.items():
            if not records:
                continue
            with self._lock:
                epoch = self._epochs.get(tp, 0)
                for record in records:
                    self._tracker.add(tp, record.offset)
                self._positions[tp] = records[-1].offset + 1
            accepted += [InRecord.from_consumer(record, epoch) for record in records]
        if accepted:
            self.metrics.events_in.inc(len(accepted))
            self._work.put(accepted)

    def _drain_acks(self, wait_s: float = 0.0) -> None:
        done: list[InRecord] = []
        while True:
            try:
                ack = self._acks.get(timeout=wait_s) if wait_s else self._acks.get_nowait()
            except queue.Empty:
                break
            wait_s = 0.0
            if ack.error is not None:
                # Not acknowledged means not committable: stop here and let redelivery finish the job.
                log.error("worker.publish_failed", offset=ack.record.offset, partition=ack.record.partition,
                          error=f"{type(ack.error).__name__}: {ack.error}")
                self._fatal = ack.error
                continue
            done.append(ack.record)
        # One lock for all of them: it is the rebalance callbacks' and the processing thread's too.
        with self._lock:
            for record in done:
                tp = record.tp
                if self._epochs.get(tp, 0) == record.epoch:
                    self._tracker.done(tp, record.offset)
            self.metrics.in_flight.set(self._tracker.in_flight())

    def _flow_control(self, consumer: KafkaConsumer) -> None:
        w = self._settings.worker
        assigned = consumer.assignment()
        with self._lock:
            total = self._tracker.in_flight()
            want = {
                tp for tp in assigned
                if self._stop.is_set()
                or self.outage.active
                or total >= w.max_in_flight
                or self._tracker.in_flight(tp) >= w.max_in_flight_per_partition
            }
            pause, resume = want - self._paused, (self._paused & assigned) - want
            self._paused = want
        if pause:
            consumer.pause(*pause)
        if resume:
            consumer.resume(*resume)
        # Every time, not only on resume: the fetcher restores one parked partition per poll.
        _unpark_resumed(consumer)
        self.metrics.paused_partitions.set(len(want))

    def _commit(self, consumer: KafkaConsumer) -> None:
        with self._lock:
            points = self._tracker.commit_points(consumer.assignment())
        if not points:
            return
        try:
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in points.items()})
        except KafkaError as exc:
            # E.g. a rebalance in progress: the work stays uncommitted and is redelivered, never lost.
            log.warning("worker.commit_failed", error=f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            self._tracker.mark_committed(points)
        self.metrics.commits.inc()
        log.debug("worker.committed", offsets={f"{tp.topic}-{tp.partition}": o for tp, o in points.items()})

    def _update_lag(self, consumer: KafkaConsumer) -> None:
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            position = self._positions.get(tp)
            if high is not None and position is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - position))
        for runner in self.scorer.runners:
            # The runners count on their own; export the growth since the last look.
            name, stats = runner.spec.name, runner.stats
            seen_errors, seen_timeouts = self._detector_seen.get(name, (0, 0))
            self.metrics.detector_errors.labels(name).inc(stats.errors - seen_errors)
            self.metrics.detector_timeouts.labels(name).inc(stats.timeouts - seen_timeouts)
            self._detector_seen[name] = (stats.errors, stats.timeouts)

    # -- processing thread ----------------------------------------------------------------------------

    def _process_forever(self, processor: BatchProcessor) -> None:
        w = self._settings.worker
        pending: deque[InRecord] = deque()  # taken off the queue, not yet in a batch
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                try:
                    # With deferred records, wake up regularly to re-check their leases.
                    polled = self._work.get(timeout=_WAITING_RECHECK_S if processor.waiting else None)
                except queue.Empty:
                    polled = []  # a wake-up without a new record
                if polled is None:
                    return
                pending.extend(polled)
            deadline = time.monotonic() + w.batch_wait_ms / 1000.0
            while len(pending) < w.batch_size and not stopping:
                try:
                    polled = self._work.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if polled is None:
                    stopping = True  # finish what was taken, then stop
                    break
                pending.extend(polled)
            batch = [pending.popleft() for _ in range(min(w.batch_size, len(pending)))]
            with self._lock:
                current = [r for r in batch if self._epochs.get(r.tp, 0) == r.epoch]
                processor.drop_waiting(lambda r: self._epochs.get(r.tp, 0) != r.epoch)
            if current or processor.waiting:
                try:
                    processor.process(current)
                except Exception as exc:  # noqa: BLE001 - the processor dead-letters per record; this is a bug
                    log.exception("worker.batch_failed")
                    self._fatal = exc
                    self._stop.set()

    # -- rebalance (called on kafka-python's IO thread) -----------------------------------------------

    def _revoked(self, consumer: KafkaConsumer, partitions: set[TopicPartition], commit: bool) -> None:
        with self._lock:
            points = self._tracker.commit_points(partitions) if commit else {}
            for tp in partitions:
                self._epochs[tp] = self._epochs.get(tp, 0) + 1
                self._positions.pop(tp, None)
                resume = self._tracker.resume_point(tp)
                if resume is not None:
                    self._resume[tp] = resume
            self._tracker.forget(partitions)
        if points:
            # A blocking commit on the IO thread raises in kafka-python 3.x; an async one is queued ahead
            # of the rebalance's JoinGroup on the same coordinator connection.
            consumer.commit_async({tp: OffsetAndMetadata(o, "", -1) for tp, o in points.items()})
        log.info("worker.partitions_revoked", partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in partitions),
                 committed=len(points), lost=not commit)

    def _assigned(self, consumer: KafkaConsumer, partitions: set[TopicPartition]) -> None:
        """A new epoch for each assigned partition, fetching again from where nothing unfinished is skipped.

        kafka-python 3.0.12 (EAGER protocol) keeps a partition's fetch position and paused flag when the
        rebalance hands it back to the same member, and it applies the assignment before calling this. So
        two kinds of records were fetched but will never be judged here, being of an older epoch: those in
        flight at the revoke, and those a poll returned since (between the revoke and now). Without a seek
        back, the next commit would pass them: they would be lost, not merely late."""
        with self._lock:
            stale = set(self._resume) | partitions
            rewind: dict[TopicPartition, int] = {}
            for tp in stale:
                self._epochs[tp] = self._epochs.get(tp, 0) + 1
                points = [p for p in (self._resume.get(tp), self._tracker.resume_point(tp)) if p is not None]
                if tp in partitions and points:
                    rewind[tp] = min(points)
            self._tracker.forget(stale)
            self._resume.clear()  # a partition not handed back lost its state: it starts from the commit
            self._paused -= stale
        for tp, offset in rewind.items():
            consumer.seek(tp, offset)
        if partitions:
            consumer.resume(*partitions)  # flow control pauses them again if it must
        log.info("worker.partitions_assigned", partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in partitions),
                 rewound={f"{tp.topic}-{tp.partition}": o for tp, o in sorted(rewind.items())})

    def _is_current(self, record: InRecord) -> bool:
        with self._lock:
            return self._epochs.get(record.tp, 0) == record.epoch

    def _readiness(self) -> dict[str, Any]:
        consumer = self._consumer
        assigned = len(consumer.assignment()) if consumer is not None else 0
        detectors = {r.spec.name: r.ready for r in self.scorer.runners}
        detectors_ok = not detectors or any(detectors.values())
        outage = self.outage.active
        return {
            "ready": assigned > 0 and detectors_ok and not outage and not self._stop.is_set(),
            "partitions_assigned": assigned,
            "detectors": detectors,
            "outage": outage,
            "redis": "up" if self.dedupe.available else "down",
            "stopping": self._stop.is_set(),
        }


def _unpark_resumed(consumer: KafkaConsumer) -> None:
    """Work around kafka-python 3.0.12 losing a paused partition's buffered records.

    Records fetched for a partition that is then paused are parked; on resume the fetcher restores them
    only when its in-line slot ``is None``, but after any poll that slot holds an exhausted (falsy) record
    set, so the records stay parked and the partition is never fetched again: the worker stalls with
    lag growing. Clearing the exhausted slot lets the fetcher's own restore path run. Guarded so that a
    kafka-python without these attributes (a fixed release) is left alone.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    slot = getattr(fetcher, "_next_partition_records", None)
    if slot is not None and not slot and getattr(fetcher, "_paused_partition_records", None):
        fetcher._next_partition_records = None  # type: ignore[union-attr]


def _failed_partition(consumer: KafkaConsumer, exc: BaseException) -> TopicPartition | None:
    """The partition whose record the last ``poll()`` failed to read, or None when the failure was not
    about reading a record (those still stop the worker).

    A record failure is one raised while kafka-python unpacked records (its traceback passes through
    ``_unpack_records``, also when the error was deferred to a later poll behind other partitions'
    records). kafka-python 3.0.x keeps the partition it was unpacking in the fetcher's in-line slot.
    Guarded, so another kafka-python makes the failure surface as before instead of skipping the wrong
    record (tests/test_poison.py would then fail)."""
    if not _raised_in(exc, "_unpack_records"):
        return None
    part = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
    return getattr(part, "topic_partition", None)


def _raised_in(exc: BaseException, function: str) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker, consumer: KafkaConsumer) -> None:
        self._worker = worker
        self._consumer = consumer

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._worker._revoked(self._consumer, set(revoked), commit=True)

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._worker._revoked(self._consumer, set(lost), commit=False)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker._assigned(self._consumer, set(assigned))
