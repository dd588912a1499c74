"""Publishing verdicts and dead letters, and reporting each broker acknowledgement back to the loop.

A record counts as finished only when the broker acknowledged what was published for it (its verdict, and
its review request when it has one); the producer's callbacks run on its IO thread, so they only put
``(partition, offset, epoch)`` on a queue that the poll loop drains. ``flush()`` does not raise for failed
sends, so each send's outcome is checked on its own.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from kafka import KafkaProducer

from streamguard.config import ReviewSettings, Settings, WorkerSettings
from streamguard.schemas import DeadLetter, ReviewRequest, Verdict
from streamguard.worker.records import InRecord

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Ack:
    record: InRecord
    error: Exception | None = None


def producer_config(settings: Settings) -> dict[str, Any]:
    return settings.kafka.client_config() | {
        "acks": "all",
        "linger_ms": 5,
        "batch_size": settings.kafka.producer_batch_bytes,
        "max_request_size": settings.worker.max_record_bytes + 1024 * 1024,
        "compression_type": settings.kafka.compression_type,
    }


@dataclass(frozen=True)
class OutMessage:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


_MAX_DEAD_LETTER_KEY_BYTES = 4096
_MAX_EXCEPTION_HEADER_BYTES = 4096


def verdict_message(settings: WorkerSettings, verdict: Verdict) -> OutMessage:
    return OutMessage(
        settings.output_topic,
        key=verdict.event_id.encode(),
        value=verdict.model_dump_json().encode(),
        headers=[("sg-record", b"verdict"), ("sg-label", verdict.label.encode())]
        + ([("sg-tenant", verdict.tenant.encode())] if verdict.tenant is not None else []),
    )


def review_message(topic: str, request: ReviewRequest) -> OutMessage:
    headers = [("sg-record", b"review-request"), ("sg-reason", request.reason.encode())]
    if request.tenant is not None:
        headers.append(("sg-tenant", request.tenant.encode()))
    return OutMessage(topic, key=request.content_sha256.encode(), value=request.model_dump_json().encode(),
                      headers=headers)


def dead_letter_message(settings: WorkerSettings, record: InRecord, letter: DeadLetter) -> OutMessage:
    """The dead letter for ``record``: the original bytes stay the value, so it can be replayed as it was.

    Its size is bounded whatever the input: a letter the producer refuses would be a failed publish, which
    stops the worker, and the next owner of the partition would meet the same record (a crash loop). So the
    value, the key and the copied headers are each capped, and what was left out is said in a header."""
    headers = [
        ("sg-dlt-original-topic", str(record.topic).encode()),
        ("sg-dlt-original-partition", str(record.partition).encode()),
        ("sg-dlt-original-offset", str(record.offset).encode()),
        ("sg-dlt-original-timestamp", str(record.timestamp_ms).encode()),
        ("sg-dlt-exception-class", letter.error_type.encode()),
        ("sg-dlt-exception-message", letter.message.encode("utf-8", "replace")[:_MAX_EXCEPTION_HEADER_BYTES]),
        ("sg-dlt-stage", letter.stage.encode()),
        ("sg-dlt-group", (letter.group_id or "").encode()),
        ("sg-dlt-attempt", str(letter.attempt).encode()),
        ("sg-dead-letter", letter.model_dump_json().encode()),
    ]
    copied, omitted, omitted_bytes = _copy_headers(record.headers, settings.dead_letter_max_header_bytes)
    headers += copied
    if omitted:
        headers.append(("sg-dlt-headers-omitted", f"{omitted} headers, {omitted_bytes} bytes".encode()))
    value = record.value or b""
    # max_record_bytes bounds the value too: the producer's request limit is that plus room for headers.
    if len(value) > min(settings.dead_letter_max_value_bytes, settings.max_record_bytes):
        headers.append(("sg-dlt-value-omitted-bytes", str(len(value)).encode()))
        value = b""
    key = record.key
    if key is not None and len(key) > _MAX_DEAD_LETTER_KEY_BYTES:
        headers.append(("sg-dlt-key-omitted-bytes", str(len(key)).encode()))
        key = None
    return OutMessage(settings.dead_letter_topic, key=key, value=value, headers=headers)


def _copy_headers(headers: tuple[tuple[str, bytes], ...], budget: int) -> tuple[list[tuple[str, bytes]], int, int]:
    """The original headers that fit in ``budget`` bytes, in order; and the count and size of the rest.
    A replayed dead letter's own ``sg-dlt-*`` headers are replaced, not copied."""
    copied: list[tuple[str, bytes]] = []
    used = omitted = omitted_bytes = 0
    for name, value in headers:
        if name.startswith("sg-dlt-") or name == "sg-dead-letter":
            continue
        size = len(name.encode("utf-8", "replace")) + len(value)
        if used + size > budget:
            omitted, omitted_bytes = omitted + 1, omitted_bytes + size
            continue
        copied.append((name, value))
        used += size
    return copied, omitted, omitted_bytes


class Sink(Protocol):
    """Where `BatchProcessor` sends each record's one outcome. ``review`` is passed only when the verdict
    also goes to review (``review.topic`` set); the record is finished when both are acknowledged."""

    def verdict(self, record: InRecord, verdict: Verdict, review: ReviewRequest | None = None) -> None: ...

    def dead_letter(self, record: InRecord, letter: DeadLetter) -> None: ...


class Publisher:
    """The Kafka sink: every send's acknowledgement (or failure) goes on the ``acks`` queue."""

    def __init__(self, settings: Settings, producer: KafkaProducer, acks: queue.SimpleQueue[Ack]) -> None:
        self._worker = settings.worker
        self._review = settings.review
        self._producer = producer
        self._acks = acks

    def verdict(self, record: InRecord, verdict: Verdict, review: ReviewRequest | None = None) -> None:
        messages = [verdict_message(self._worker, verdict)]
        if review is not None and self._review.topic is not None:
            # The review request first: committing on the verdict's ack alone could lose the request.
            messages.insert(0, review_message(self._review.topic, review))
        self._send(record, *messages)

    def dead_letter(self, record: InRecord, letter: DeadLetter) -> None:
        self._send(record, dead_letter_message(self._worker, record, letter))

    def _send(self, record: InRecord, *messages: OutMessage) -> None:
        if len(messages) == 1:
            self._send_one(record, messages[0])
            return
        joined = _Joined(record, len(messages), self._acks)
        for message in messages:
            try:
                future = self._producer.send(message.topic, key=message.key, value=message.value,
                                             headers=message.headers)
            except Exception as exc:  # noqa: BLE001 - e.g. a record over the size limit: still an outcome
                joined.failed(exc)
                return
            future.add_callback(lambda _meta: joined.sent())
            future.add_errback(joined.failed)

    def _send_one(self, record: InRecord, message: OutMessage) -> None:
        """The common case, one message a record: its future says sent or failed, never both, so the
        acknowledgement needs no `_Joined` (a lock per record on the producer's IO thread)."""
        acks = self._acks
        try:
            future = self._producer.send(message.topic, key=message.key, value=message.value,
                                         headers=message.headers)
        except Exception as exc:  # noqa: BLE001 - e.g. a record over the size limit: still an outcome
            acks.put(Ack(record, exc))
            return
        future.add_callback(lambda _meta: acks.put(Ack(record)))
        future.add_errback(lambda exc: acks.put(Ack(record, exc)))

    def flush(self, timeout_s: float) -> None:
        """Wait for outstanding sends, so their acknowledgements are queued before a final commit."""
        try:
            self._producer.flush(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - what did not finish stays uncommitted and is redelivered
            log.warning("worker.flush_incomplete", error=f"{type(exc).__name__}: {exc}")

    def close(self, timeout_s: float) -> None:
        self._producer.close(timeout=timeout_s)


class _Joined:
    """One acknowledgement for a record whose outcome is several messages: when all were sent, or at the
    first failure (which stops the worker uncommitted, whatever the others do)."""

    def __init__(self, record: InRecord, expected: int, acks: queue.SimpleQueue[Ack]) -> None:
        self._record = record
        self._left = expected
        self._acks = acks
        self._lock = threading.Lock()

    def sent(self) -> None:
        with self._lock:
            self._left -= 1
            done = self._left == 0
        if done:
            self._acks.put(Ack(self._record))

    def failed(self, exc: Exception) -> None:
        with self._lock:
            first = self._left > 0
            self._left = -1
        if first:
            self._acks.put(Ack(self._record, exc))


@dataclass
class ListPublisher:
    """An in-memory sink for tests and benchmarks of the pipeline without a broker (bytewax's
    TestingSink): it keeps each outcome, builds the same messages the Kafka sink would send, and
    acknowledges at once when given an ``acks`` queue."""

    settings: WorkerSettings = field(default_factory=WorkerSettings)
    acks: queue.SimpleQueue[Ack] | None = None
    verdicts: list[tuple[InRecord, Verdict]] = field(default_factory=list)
    dead_letters: list[tuple[InRecord, DeadLetter]] = field(default_factory=list)
    messages: list[OutMessage] = field(default_factory=list)
    review: ReviewSettings = field(default_factory=ReviewSettings)
    reviews: list[tuple[InRecord, ReviewRequest]] = field(default_factory=list)

    def verdict(self, record: InRecord, verdict: Verdict, review: ReviewRequest | None = None) -> None:
        if review is not None:
            self.reviews.append((record, review))
            self.messages.append(review_message(self.review.topic or "review", review))
        self.verdicts.append((record, verdict))
        self._keep(record, verdict_message(self.settings, verdict))

    def dead_letter(self, record: InRecord, letter: DeadLetter) -> None:
        self.dead_letters.append((record, letter))
        self._keep(record, dead_letter_message(self.settings, record, letter))

    def _keep(self, record: InRecord, message: OutMessage) -> None:
        self.messages.append(message)
        if self.acks is not None:
            self.acks.put(Ack(record))

    def outcomes(self) -> dict[int, str]:
        """Offset -> "verdict" or the dead letter's error type: one entry per record published."""
        out: dict[int, str] = {record.offset: "verdict" for record, _ in self.verdicts}
        for record, letter in self.dead_letters:
            out[record.offset] = letter.error_type
        return out
