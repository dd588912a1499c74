"""Publishing verdicts and dead letters, and reporting each broker acknowledgement back to the loop.

A record counts as finished only when the broker acknowledged what was published for it; the producer's
callbacks run on its IO thread, so they only put ``(partition, offset, epoch)`` on a queue that the poll
loop drains. ``flush()`` does not raise for failed sends, so each send's outcome is checked on its own.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any

import structlog
from kafka import KafkaProducer

from streamguard.config import Settings
from streamguard.schemas import DeadLetter, Verdict
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
        "max_request_size": settings.worker.max_record_bytes + 1024 * 1024,
    }


class Publisher:
    def __init__(self, settings: Settings, producer: KafkaProducer, acks: queue.SimpleQueue[Ack]) -> None:
        self._worker = settings.worker
        self._producer = producer
        self._acks = acks

    def verdict(self, record: InRecord, verdict: Verdict) -> None:
        self._send(
            record,
            self._worker.output_topic,
            key=verdict.event_id.encode(),
            value=verdict.model_dump_json().encode(),
            headers=[("sg-record", b"verdict"), ("sg-label", verdict.label.encode())],
        )

    def dead_letter(self, record: InRecord, letter: DeadLetter) -> None:
        """The original bytes stay the value, so a dead letter can be replayed as it was."""
        headers = [
            ("sg-dlt-original-topic", str(record.topic).encode()),
            ("sg-dlt-original-partition", str(record.partition).encode()),
            ("sg-dlt-original-offset", str(record.offset).encode()),
            ("sg-dlt-original-timestamp", str(record.timestamp_ms).encode()),
            ("sg-dlt-exception-class", letter.error_type.encode()),
            ("sg-dlt-exception-message", letter.message.encode("utf-8", "replace")[:4096]),
            ("sg-dlt-stage", letter.stage.encode()),
            ("sg-dlt-group", (letter.group_id or "").encode()),
            ("sg-dlt-attempt", str(letter.attempt).encode()),
            ("sg-dead-letter", letter.model_dump_json().encode()),
        ]
        headers += [(name, value) for name, value in record.headers if not name.startswith("sg-dlt-")]
        value = record.value or b""
        if len(value) > self._worker.dead_letter_max_value_bytes:
            # An oversized payload would be refused by the broker again, and the letter lost with it.
            headers.append(("sg-dlt-value-omitted-bytes", str(len(value)).encode()))
            value = b""
        self._send(record, self._worker.dead_letter_topic, key=record.key, value=value, headers=headers)

    def _send(self, record: InRecord, topic: str, key: bytes | None, value: bytes,
              headers: list[tuple[str, bytes]]) -> None:
        try:
            future = self._producer.send(topic, key=key, value=value, headers=headers)
        except Exception as exc:  # noqa: BLE001 - e.g. a record over the size limit: still an outcome
            self._acks.put(Ack(record, exc))
            return
        future.add_callback(lambda _meta: self._acks.put(Ack(record)))
        future.add_errback(lambda exc: self._acks.put(Ack(record, exc)))

    def close(self, timeout_s: float) -> None:
        self._producer.close(timeout=timeout_s)
