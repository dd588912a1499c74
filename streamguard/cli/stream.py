"""``streamguard produce`` and ``streamguard tail``: put images on the input topic, read a topic back."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from streamguard.cli.context import AppContext
from streamguard.scan_inputs import Missing, expand
from streamguard.schemas import ImageEvent

if TYPE_CHECKING:  # kafka-python is imported only by the commands that talk to a broker
    from streamguard.streamio import Message
    from streamguard.wire import Encoding

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

    from streamguard.streamio import Failed, send_all
    from streamguard.worker.publish import producer_config

    settings = app.settings
    topic = topic or settings.worker.input_topic
    not_found: list[str] = []
    producer = KafkaProducer(**producer_config(settings))
    results = send_all(producer, topic, _messages(paths, encoding, repeat, source, not_found))  # type: ignore[arg-type]
    producer.close()
    failed = [r for r in results if isinstance(r, Failed)]
    for failure in failed:
        click.echo(f"failed: {failure.event_id}: {failure.error}", err=True)
    click.echo(json.dumps({"topic": topic, "sent": len(results) - len(failed), "failed": len(failed),
                           "missing": len(not_found)}))
    sys.exit(1 if failed or not_found else 0)


def _messages(paths: tuple[str, ...], encoding: Encoding, repeat: int, source: str,
              not_found: list[str]) -> Iterator[Message]:
    """Events for the files named, read one at a time as the producer takes them; reports (and appends to
    ``not_found``) each argument that names nothing."""
    from streamguard.streamio import event_message

    for item in expand(paths, sys.stdin):
        if isinstance(item, Missing):
            click.echo(f"not found: {item.argument}", err=True)
            not_found.append(item.argument)
            continue
        data = item.read_bytes()
        for _ in range(repeat):
            event = ImageEvent(event_id=f"{item.stem}-{uuid.uuid4().hex[:12]}", image=data,
                               content_type=_CONTENT_TYPES.get(item.suffix.lower()), source=source,
                               metadata={"path": str(item)})
            yield event_message(event, encoding)


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
    from streamguard.streamio import TopicReader

    settings = app.settings
    topics = topics or (settings.worker.output_topic, settings.worker.dead_letter_topic)
    seen = 0
    with TopicReader(settings.kafka.client_config(), topics) as reader:
        for record in reader.records(count, idle_s=timeout_s):
            click.echo(_describe(record, as_json))
            seen += 1
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
