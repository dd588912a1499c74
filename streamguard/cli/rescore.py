"""``streamguard rescore``: judge already-judged content again with the current models and policy, and
publish the verdicts whose label changed; or audit a bank, routing what the models now label otherwise to
review."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from streamguard.cli.context import AppContext, detector_timeout_option

log = structlog.get_logger(__name__)
pass_app = click.make_pass_decorator(AppContext)

# Stopped before the end of its range by something outside it (Triton, Redis, the broker): run it again.
STOPPED_EXIT = 3

_TOPIC_OPTIONS = "--topic, --events-topic, --from-offset, --to-offset, --since, --until, --events-since"


@click.command("rescore")
@click.option("--topic", help="Verdicts topic to replay (default: worker.output_topic unless --data is given).")
@click.option("--data", "data", multiple=True, help="Image files, directories, globs, tar archives or dataset "
              "manifests instead of a topic, compared with their cached verdicts (repeatable); with --bank, "
              "the images matched to the bank.")
@click.option("--bank", help="Audit this bank: judge its images (fetched by the URI each entry was banked with, "
              "or --data) and send those the models now label otherwise to review; no verdict is published.")
@click.option("--review-topic", help="With --bank: where disagreements go (default: review.topic).")
@click.option("--tenant", help="With --bank: whose policy decides (default: the default tenant if it matches the "
              "bank, else the first configured tenant that does).")
@click.option("--include-uncertain", is_flag=True, help="With --bank: route entries the models are uncertain "
              "about too (default: only the opposite label).")
@click.option("--events-topic", help="Where the verdicts' events are (default: worker.input_topic).")
@click.option("--from-offset", "from_offsets", multiple=True, metavar="[P:]N",
              help="First offset of the range, for every partition or for partition P (repeatable).")
@click.option("--to-offset", "to_offsets", multiple=True, metavar="[P:]N", help="End of the range, exclusive.")
@click.option("--since", help="Verdicts published at or after this time (ISO 8601 or epoch ms).")
@click.option("--until", help="Verdicts published before this time.")
@click.option("--events-since", help="Read events from this time on (default: --since, else the beginning).")
@click.option("--output-topic", help="Where changed verdicts go (default: worker.output_topic).")
@click.option("--previous-versions", multiple=True, metavar="KEY",
              help="With --data: the dedupe versions keys to compare with (default: every one in the cache).")
@click.option("--max-records", type=click.IntRange(min=1), help="Stop after this many records, files or bank "
              "entries; running the command again carries on.")
@click.option("--chunk-size", type=click.IntRange(1, 10_000), default=64, show_default=True,
              help="Records judged and checkpointed together: a killed run redoes at most one chunk.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Progress file (default: one per run under --state-dir).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".streamguard/rescore"),
              show_default=True)
@click.option("--restart", is_flag=True, help="Forget saved progress and start the range again.")
@click.option("--dry-run", is_flag=True, help="Print the changes (JSON lines); publish, cache and save nothing.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
@detector_timeout_option
@pass_app
def rescore_command(app: AppContext, topic: str | None, data: tuple[str, ...], bank: str | None,
                    review_topic: str | None, tenant: str | None, include_uncertain: bool, events_topic: str | None,
                    from_offsets: tuple[str, ...], to_offsets: tuple[str, ...],
                    since: str | None, until: str | None, events_since: str | None, output_topic: str | None,
                    previous_versions: tuple[str, ...], max_records: int | None, chunk_size: int,
                    state_path: Path | None, state_dir: Path, restart: bool, dry_run: bool, progress: bool | None,
                    detector_timeout_s: float | None) -> None:
    """Replay a verdicts topic range (joined with its events) or image files through the current models
    and policy; publish the verdicts whose label changed (with rescored_from) and refresh the dedupe cache.
    With --bank, audit a bank: its entries the models now label otherwise go to the review topic.

    Checkpointed per chunk: run the same command again to carry on after a stop or a kill."""
    from streamguard.rescore.ranges import RangeError, RangeRequest, parse_offsets, parse_time

    topic_options = topic or events_topic or from_offsets or to_offsets or since or until or events_since
    if (data or bank) and topic_options:
        raise click.UsageError(f"--data and --bank take none of the topic range options ({_TOPIC_OPTIONS})")
    if bank is None and (review_topic or tenant or include_uncertain):
        raise click.UsageError("--review-topic, --tenant and --include-uncertain go with --bank")
    if bank is not None and (output_topic or previous_versions):
        raise click.UsageError("--bank publishes no verdicts and reads no cache: no --output-topic or "
                               "--previous-versions")
    settings = app.offline_settings(detector_timeout_s)
    output = output_topic or settings.worker.output_topic
    try:
        if bank is not None:
            job: Any = _bank_job(settings, bank, data, review_topic, tenant, include_uncertain, dry_run)
        elif data:
            job = _data_job(data, output, previous_versions)
        else:
            from streamguard.rescore.jobs import TopicJob

            request = RangeRequest(parse_offsets(from_offsets), parse_offsets(to_offsets),
                                   None if since is None else parse_time(since),
                                   None if until is None else parse_time(until))
            job = TopicJob(topic or settings.worker.output_topic, events_topic or settings.worker.input_topic,
                           output, request, parse_time(events_since) if events_since else request.since_ms)
    except RangeError as exc:
        raise click.UsageError(str(exc)) from None
    _run(app, settings, job, max_records=max_records, chunk_size=chunk_size, state_path=state_path,
         state_dir=state_dir, restart=restart, dry_run=dry_run, progress=progress)


def _data_items(arguments: tuple[str, ...]) -> list[Any]:
    from streamguard.rescore.files import expand_data

    try:
        items, missing = expand_data(arguments, sys.stdin)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if missing:
        raise click.UsageError(f"not found: {', '.join(missing)}")
    return items


def _bank_job(settings: Any, bank: str, data: tuple[str, ...], review_topic: str | None, tenant: str | None,
              include_uncertain: bool, dry_run: bool) -> Any:
    from streamguard.rescore.banked import subscribing_tenant
    from streamguard.rescore.jobs import BankJob

    topic = review_topic or settings.review.topic
    if topic is None and not dry_run:
        raise click.UsageError("a bank audit routes disagreements to review: set review.topic or give "
                               "--review-topic (or --dry-run)")
    return BankJob(bank, topic or "", tenant or subscribing_tenant(settings, bank),
                   _data_items(data) if data else (), include_uncertain)


def _data_job(arguments: tuple[str, ...], output: str, previous_versions: tuple[str, ...]) -> Any:
    from streamguard.rescore.jobs import DataJob

    return DataJob(_data_items(arguments), output, previous_versions)


def _run(app: AppContext, settings: Any, job: Any, *, max_records: int | None, chunk_size: int,
         state_path: Path | None, state_dir: Path, restart: bool, dry_run: bool, progress: bool | None) -> None:
    from redis.exceptions import RedisError

    from streamguard.banks import BanksUnavailable
    from streamguard.rescore.events import EventsUnavailable
    from streamguard.rescore.jobs import BankJob, TopicJob
    from streamguard.rescore.judge import Rescorer
    from streamguard.rescore.ranges import RangeError
    from streamguard.rescore.run import CacheUnavailable, PublishFailed, Rescore
    from streamguard.rescore.sources import SourceStalled
    from streamguard.rescore.state import RunState, StateFile, StateMismatch, job_id
    from streamguard.scoring import DetectorsUnavailable
    from streamguard.worker.loop import build_scorer

    config = settings.kafka.client_config()
    scorer = build_scorer(settings, app.plugin_manager)
    rescorer = Rescorer(settings, scorer)
    identity = job.identity()
    state_file = StateFile(state_path or state_dir / f"rescore-{job_id(identity)}.json")
    if restart:
        state_file.remove()
    try:
        state = state_file.load(identity, rescorer.versions_key)
    except StateMismatch as exc:
        raise click.ClickException(f"{exc}; use --restart (or another --state) to start over") from None
    store = _bank_store(settings, job) if isinstance(job, BankJob) else None
    try:
        if state is None:
            if isinstance(job, TopicJob):
                cursors = job.first_cursors(config)
            else:
                cursors = job.first_cursors(store) if store is not None else job.first_cursors()
            state = RunState(identity, rescorer.versions_key, cursors,
                             start_cursors={k: list(v) for k, v in cursors.items()})
            if not dry_run:
                state_file.save(state)  # the range is fixed now, whatever the topic holds on a rerun
        if state.done:
            if store is not None:
                store.close()
            _report(state, state_file.path, None, dry_run)
            return
        state.runs += 1
        source, outlet, closers = _open(settings, job, state, rescorer, store, dry_run)
    except RangeError as exc:
        raise click.UsageError(str(exc)) from None
    except BanksUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    show = progress if progress is not None else sys.stderr.isatty()
    bar = _bar(show, state.total, state.completed)
    on_change = (_print_disagreement if store is not None else _print_change) if dry_run else lambda j: None
    runner = Rescore(source, rescorer, outlet, state, None if dry_run else state_file,
                     on_chunk=bar.advance, on_change=on_change)
    stopped: str | None = None
    try:
        with scorer:
            summary = runner.run(chunk_size, max_records)
    except (DetectorsUnavailable, PublishFailed, CacheUnavailable, EventsUnavailable, SourceStalled,
            RedisError, BanksUnavailable) as exc:
        stopped = f"{type(exc).__name__}: {exc}"
        log.error("rescore.stopped", reason=stopped, hint="run the same command again to carry on")
        summary = None
    finally:
        bar.stop()
        source.close()
        for close in closers:
            close()
    _report(state, state_file.path, summary, dry_run, stopped)
    if stopped:
        sys.exit(STOPPED_EXIT)


def _bank_store(settings: Any, job: Any) -> Any:
    """The bank's store, the bank checked to exist (and its near index loaded when files are matched)."""
    from streamguard.banks import BanksUnavailable, BankStore

    store = BankStore(settings)
    try:
        if job.bank not in {info.name for info in store.banks()}:
            raise click.ClickException(f"no bank named {job.bank!r}")
        if job.files:
            store.refresh()
    except BanksUnavailable as exc:
        store.close()
        raise click.ClickException(str(exc)) from None
    except click.ClickException:
        store.close()
        raise
    return store


def _open(settings: Any, job: Any, state: Any, rescorer: Any, store: Any, dry_run: bool) -> tuple[Any, Any, list]:
    """The job's source and outlet, and what to close after the run besides the source."""
    from streamguard.dedupe import open_store
    from streamguard.fetch import ImageFetcher
    from streamguard.rescore.audit import ReviewOutlet, ReviewPublisher
    from streamguard.rescore.banked import BankFilesSource, BankSource
    from streamguard.rescore.events import EventImages
    from streamguard.rescore.jobs import TopicJob
    from streamguard.rescore.previous import PreviousVerdicts, discover_versions_keys, redis_client
    from streamguard.rescore.run import VerdictOutlet, VerdictPublisher
    from streamguard.rescore.sources import ENTRIES_CURSOR, FILES_CURSOR, DatasetSource, TopicSource

    config = settings.kafka.client_config()
    source: Any
    if store is not None:
        if job.files:
            source = BankFilesSource(job.files, state.cursors[FILES_CURSOR], store, job.bank, job.tenant,
                                     settings.intake)
        else:
            source = BankSource(store, job.bank, state.cursors[ENTRIES_CURSOR], job.tenant,
                                ImageFetcher(settings.fetch, settings.intake.max_bytes))
        reviews = None if dry_run else ReviewPublisher(settings, job.review_topic)
        return source, ReviewOutlet(reviews, job.include_uncertain), [reviews.close] if reviews else []
    if isinstance(job, TopicJob):
        events = EventImages(config, job.events_topic, job.events_since_ms,
                             max_record_bytes=settings.worker.max_record_bytes + 1024 * 1024)
        source = TopicSource(config, job.topic, state.cursors, events,
                             ImageFetcher(settings.fetch, settings.intake.max_bytes))
    else:
        if not settings.dedupe.enabled:
            raise click.ClickException("--data compares with the dedupe cache, and dedupe.enabled is false")
        client = redis_client(settings.redis)
        keys = list(job.previous_versions) or discover_versions_keys(client, settings.dedupe.namespace)
        source = DatasetSource(job.paths, state.cursors[FILES_CURSOR],
                               PreviousVerdicts(client, settings.dedupe.namespace, keys, rescorer.versions_key))
    dedupe = open_store(settings.dedupe, settings.redis)
    publisher = None if dry_run else VerdictPublisher(settings, job.output_topic)
    closers = [dedupe.close, *([publisher.close] if publisher is not None else [])]
    return source, VerdictOutlet(publisher, dedupe), closers


def _print_change(judged: Any) -> None:
    click.echo(json.dumps({"event_id": judged.current.event_id, "content_sha256": judged.current.content_sha256,
                           "from": judged.previous.label, "to": judged.current.label,
                           "probability": judged.current.probability}))


def _print_disagreement(judged: Any) -> None:
    banked = judged.banked
    click.echo(json.dumps({"bank": judged.previous.matched_bank.bank, "content_sha256": judged.current.content_sha256,
                           "bank_label": judged.previous.label, "model_label": judged.current.label,
                           "probability": judged.current.probability, "image_uri": banked.uri,
                           "path": banked.path}))


def _report(state: Any, path: Path, summary: Any, dry_run: bool, stopped: str | None = None) -> None:
    out = {"done": state.done, "dry_run": dry_run, "state": str(path),
           "this_run": dict(summary.counts) if summary is not None else {},
           "all_runs": dict(state.counts), "cursors": state.cursors}
    if stopped:
        out["stopped"] = stopped
    click.echo(json.dumps(out, sort_keys=True))


class _Bar:
    def __init__(self, progress: Progress | None, task: Any) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _bar(enabled: bool, total: int, completed: int) -> _Bar:
    if not enabled:
        return _Bar(None, None)
    progress = Progress(TextColumn("rescoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True))
    progress.start()
    return _Bar(progress, progress.add_task("rescore", total=total, completed=completed))
