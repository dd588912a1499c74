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
@click.option("--topic", "topics", multiple=True, help="Repeatable; defaults to the output and dead-letter topics.")
@click.option("--count", type=int, help="Stop after this many records in all.")
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="Stop after this many seconds without a record.")
@click.option("--json", "as_json", is_flag=True, help="Whole records as JSON lines instead of a summary.")
@pass_app
def tail_command(app: AppContext, topics: tuple[str, ...], count: int | None, timeout_s: float,
                 as_json: bool) -> None:
    """Print verdicts and dead letters (or any topics) from the beginning."""
    from kafka import KafkaConsumer, TopicPartition

    settings = app.settings
    topics = topics or (settings.worker.output_topic, settings.worker.dead_letter_topic)
    consumer = KafkaConsumer(**settings.kafka.client_config(), enable_auto_commit=False)
    tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen, last = 0, time.monotonic()
    while (count is None or seen < count) and time.monotonic() - last < timeout_s:
        for records in consumer.poll(timeout_ms=200).values():
            for record in records:
                click.echo(_describe(record, as_json))
                seen += 1
                last = time.monotonic()
    consumer.close()
    if count is not None and seen < count:
        click.echo(f"only {seen} of {count} records within {timeout_s:g}s", err=True)
        sys.exit(1)


def _describe(record: object, as_json: bool) -> str:
    headers = {name: value.decode("utf-8", "replace") for name, value in getattr(record, "headers", None) or ()}
    raw = getattr(record, "value", None)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        value = None
    where = f"{record.topic}[{record.partition}]@{record.offset}"  # type: ignore[attr-defined]
    if as_json:
        return json.dumps({"topic": record.topic, "partition": record.partition,  # type: ignore[attr-defined]
                           "offset": record.offset, "value": value if value is not None else f"<{len(raw or b'')} bytes>",  # type: ignore[attr-defined]
                           "headers": headers})
    if "sg-dlt-exception-class" in headers:
        return (f"{where}  dead letter  {headers['sg-dlt-exception-class']}: "
                f"{headers.get('sg-dlt-exception-message', '')}")
    if isinstance(value, dict) and "label" in value:
        p = value.get("probability")
        dup = f"  duplicate of {value['duplicate_of']}" if value.get("duplicate_of") else ""
        return f"{where}  {value['event_id']}  {value['label']}  p={'-' if p is None else f'{p:.3f}'}{dup}"
    return f"{where}  {len(raw or b'')} bytes"
