"""``streamguard review apply``: the decisions topic in, verdicts out, at least once.

Per poll: every decision is applied (cache, bank), its verdict sent, every send checked, and only then the
polled offsets committed, as the worker commits only what the broker acknowledged. A decision that cannot
be read is a dead letter on ``worker.dead_letter_topic`` (stage "review"), never a stuck partition. A
failed send or bank write stops the consumer uncommitted: a restart applies those decisions again.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from streamguard.config import Settings
from streamguard.review.apply import DecisionApplier
from streamguard.schemas import DeadLetter, ReviewDecision
from streamguard.worker.publish import OutMessage, dead_letter_message, producer_config, verdict_message
from streamguard.worker.records import InRecord

log = structlog.get_logger(__name__)

_SEND_TIMEOUT_S = 30.0


class DecisionConsumer:
    def __init__(self, settings: Settings, applier: DecisionApplier) -> None:
        self._settings = settings
        self._applier = applier
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        review, kafka, worker = self._settings.review, self._settings.kafka, self._settings.worker
        # The worker's group timeouts: a killed consumer's partitions move on as fast as a worker's do.
        consumer = KafkaConsumer(**kafka.client_config(), group_id=review.group_id, enable_auto_commit=False,
                                 auto_offset_reset="earliest", max_poll_records=review.batch_size,
                                 session_timeout_ms=worker.session_timeout_ms,
                                 heartbeat_interval_ms=worker.heartbeat_interval_ms,
                                 max_poll_interval_ms=worker.max_poll_interval_ms)
        producer = KafkaProducer(**producer_config(self._settings))
        consumer.subscribe([review.decisions_topic])
        log.info("review.started", topic=review.decisions_topic, group=review.group_id)
        try:
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=200)
                records = [InRecord.from_consumer(r, 0) for batch in polled.values() for r in batch]
                if records:
                    self._publish(producer, [self._outcome(record) for record in records])
                    self._commit(consumer, records)
        finally:
            producer.close(timeout=5)
            consumer.close(autocommit=False)
        log.info("review.stopped")
        return 0

    def _outcome(self, record: InRecord) -> OutMessage:
        try:
            decision = ReviewDecision.model_validate_json(record.value or b"")
        except (ValidationError, ValueError) as exc:
            letter = DeadLetter(error_type="SchemaError", message=str(exc)[:2000], stage="review",
                                original_topic=record.topic, original_partition=record.partition,
                                original_offset=record.offset, original_timestamp_ms=record.timestamp_ms,
                                group_id=self._settings.review.group_id)
            log.warning("review.bad_decision", offset=record.offset, partition=record.partition)
            return dead_letter_message(self._settings.worker, record, letter)
        return verdict_message(self._settings.worker, self._applier.apply(decision))

    def _publish(self, producer: KafkaProducer, messages: list[OutMessage]) -> None:
        futures = [producer.send(m.topic, key=m.key, value=m.value, headers=m.headers) for m in messages]
        producer.flush(timeout=_SEND_TIMEOUT_S)
        for future in futures:
            future.get(timeout=_SEND_TIMEOUT_S)  # flush() does not raise for a failed send: this does

    def _commit(self, consumer: KafkaConsumer, records: list[InRecord]) -> None:
        ends: dict[TopicPartition, int] = {}
        for record in records:
            ends[record.tp] = max(ends.get(record.tp, 0), record.offset + 1)
        offsets: dict[Any, OffsetAndMetadata] = {tp: OffsetAndMetadata(o, "", -1) for tp, o in ends.items()}
        try:
            consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance took the partitions: their next owner applies these decisions again (idempotent).
            log.warning("review.commit_failed", error=f"{type(exc).__name__}: {exc}")
