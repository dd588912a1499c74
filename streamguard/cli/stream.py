"""``streamguard produce`` and ``streamguard tail``: put images on the input topic, read a topic back."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import click

from streamguard.cli.context import AppContext
from streamguard.scan_inputs import Missing, expand
from streamguard.schemas import ImageEvent
from streamguard.wire import encode_event

pass_app = click.make_pass_decorator(AppContext)

_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                  ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
                  ".avif": "image/avif", ".heic": "image/heic", ".heif": "image/heif"}


@click.command("produce")
@click.argument("paths", nargs=-1, required=True)
@click.option("--topic", help="Defaults to worker.input_topic.")
@click.option("--encoding", type=click.Choice(["json", "binary"]), default="binary", show_default=True)
@click.option("--repeat", type=int, default=1, show_default=True, help="Send each image this many times.")
@click.option("--source", default="streamguard-produce", show_default=True)
@pass_app
def produce_command(app: AppContext, paths: tuple[str, ...], topic: str | None, encoding: str, repeat: int,
                    source: str) -> None:
    """Publish image files (files, directories, globs, -) as events, for demos and load."""
    from kafka import KafkaProducer

    from streamguard.worker.publish import producer_config

    settings = app.settings
    topic = topic or settings.worker.input_topic
    producer = KafkaProducer(**producer_config(settings))
    futures, missing = [], 0
    for item in expand(paths, sys.stdin):
        if isinstance(item, Missing):
            click.echo(f"not found: {item.argument}", err=True)
            missing += 1
            continue
        data = item.read_bytes()
        for _ in range(repeat):
            event = ImageEvent(event_id=f"{item.stem}-{uuid.uuid4().hex[:12]}", image=data,
                               content_type=_CONTENT_TYPES.get(item.suffix.lower()), source=source,
                               metadata={"path": str(item)})
            value, headers = encode_event(event, encoding)  # type: ignore[arg-type]
            futures.append((event.event_id, producer.send(topic, key=event.event_id.encode(), value=value,
                                                          headers=headers)))
    producer.flush()
    failed = 0
    for event_id, future in futures:
        try:
            future.get(timeout=30)
        except Exception as exc:  # noqa: BLE001 - report each failed send, as flush() does not
            click.echo(f"failed: {event_id}: {exc}", err=True)
            failed += 1
    producer.close()
    click.echo(json.dumps({"topic": topic, "sent": len(futures) - failed, "failed": failed, "missing": missing}))
    sys.exit(1 if failed or missing else 0)


@click.command("tail")
@click.option("--topic", help="Defaults to worker.output_topic.")
@click.option("--count", type=int, help="Stop after this many records.")
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="Stop after this many seconds without a record.")
@pass_app
def tail_command(app: AppContext, topic: str | None, count: int | None, timeout_s: float) -> None:
    """Print a topic's records from the beginning as JSON lines (verdicts by default)."""
    from kafka import KafkaConsumer, TopicPartition

    settings = app.settings
    topic = topic or settings.worker.output_topic
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers,
                             security_protocol=settings.kafka.security_protocol, enable_auto_commit=False)
    partitions = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen, last = 0, time.monotonic()
    while (count is None or seen < count) and time.monotonic() - last < timeout_s:
        for records in consumer.poll(timeout_ms=200).values():
            for record in records:
                headers = {name: value.decode("utf-8", "replace") for name, value in record.headers or ()
                           if name.startswith("sg-dlt-")}
                try:
                    value = json.loads(record.value) if record.value else None
                except ValueError:
                    value = f"<{len(record.value)} bytes>"
                click.echo(json.dumps({"partition": record.partition, "offset": record.offset,
                                       "value": value, **({"headers": headers} if headers else {})}))
                seen += 1
                last = time.monotonic()
    consumer.close()
    if count is not None and seen < count:
        click.echo(f"only {seen} of {count} records within {timeout_s:g}s", err=True)
        sys.exit(1)
