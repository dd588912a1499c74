"""One batch of records: parse -> fetch -> sha256 -> dedupe -> decode -> detect -> fuse -> publish.

Every record leaves as exactly one published message, a verdict or a dead letter; the publisher's
acknowledgement is what lets the loop commit it. Dedupe never blocks judging: with Redis down the
store answers "not seen" and everything is scored.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from streamguard.config import Settings
from streamguard.dedupe.phash import PerceptualHash, perceptual_hash
from streamguard.dedupe.store import CachedVerdict, DedupeStore, NearMatch, versions_key
from streamguard.errors import RecordTooLarge, StreamguardError
from streamguard.fetch import ImageFetcher, event_bytes
from streamguard.schemas import DeadLetter, ImageEvent, NearDuplicate, Verdict
from streamguard.scoring import DetectorsUnavailable, ImageJob, Outcome, Scorer
from streamguard.wire import decode_event
from streamguard.worker.metrics import WorkerMetrics
from streamguard.worker.outage import OutageGate
from streamguard.worker.publish import Publisher
from streamguard.worker.records import InRecord

log = structlog.get_logger(__name__)

class InternalError(StreamguardError):
    """An unexpected failure while processing one record; it is dead-lettered, never retried forever."""


@dataclass
class _Item:
    record: InRecord
    event: ImageEvent | None = None
    data: bytes | None = None
    sha256: str | None = None
    outcome: Outcome | None = None
    phash: PerceptualHash | None = None
    near: NearMatch | None = None
    leased: bool = False
    wait_until: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


class BatchProcessor:
    def __init__(self, settings: Settings, scorer: Scorer, dedupe: DedupeStore, fetcher: ImageFetcher,
                 publisher: Publisher, metrics: WorkerMetrics, owner: str, outage: OutageGate | None = None,
                 is_current: Callable[[InRecord], bool] = lambda record: True) -> None:
        """``outage``: where to hold while a detector's server is down (None: never hold, e.g. tests of
        other stages). ``is_current``: whether this worker still owns a record's partition."""
        self._settings = settings
        self._scorer = scorer
        self._dedupe = dedupe
        self._fetcher = fetcher
        self._publisher = publisher
        self._metrics = metrics
        self._owner = owner
        self._versions_key = versions_key(scorer.model_versions, scorer.policy_version)
        self._fetch_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch")
        self._waiting: list[_Item] = []
        self._outage = outage
        self._is_current = is_current

    def close(self) -> None:
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)

    def process(self, records: Sequence[InRecord]) -> None:
        items = [_Item(record) for record in records]
        live = self._stage("parse", items, self._parse)
        live = self._fetch_all(live)
        live = self._reuse_exact(live)
        live = self._decode(live)
        live = self._reuse_near(live)
        self._judge(live)

    # -- stages ---------------------------------------------------------------------------------------

    def _stage(self, name: str, items: list[_Item], fn) -> list[_Item]:  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        live = []
        for item in items:
            try:
                fn(item)
                live.append(item)
            except StreamguardError as exc:
                self._dead_letter(item, exc)
            except Exception as exc:  # noqa: BLE001 - one record's bug must not stop the stream
                log.exception("worker.record_failed", stage=name, offset=item.record.offset)
                self._dead_letter(item, InternalError(f"{name}: {type(exc).__name__}: {exc}"))
        self._observe(name, t0, items)
        return live

    def _parse(self, item: _Item) -> None:
        value = item.record.value
        limit = self._settings.worker.max_record_bytes
        if value is not None and len(value) > limit:
            raise RecordTooLarge(f"record of {len(value)} bytes exceeds the limit of {limit}")
        item.event = decode_event(value, list(item.record.headers))

    def _fetch_all(self, items: list[_Item]) -> list[_Item]:
        t0 = time.perf_counter()
        # Only URI events need the pool: a hand-off per inline image costs more than it saves.
        futures = [
            (item, self._fetch_pool.submit(event_bytes, item.event, self._fetcher) if item.event.uri else None)  # type: ignore[union-attr]
            for item in items
        ]
        live = []
        for item, future in futures:
            try:
                item.data = future.result() if future is not None else item.event.image  # type: ignore[union-attr]
            except StreamguardError as exc:
                self._dead_letter(item, exc)
                continue
            except Exception as exc:  # noqa: BLE001
                self._dead_letter(item, InternalError(f"fetch: {type(exc).__name__}: {exc}"))
                continue
            live.append(item)
        self._observe("fetch", t0, items)
        return live

    def _reuse_exact(self, items: list[_Item]) -> list[_Item]:
        """Exact duplicates by sha256: the cached verdict if there is one, else an in-flight lease so that
        two workers never score the same content at once. Content leased by another worker is deferred,
        not waited for, so one slow copy elsewhere does not stall this worker's other records."""
        t0 = time.perf_counter()
        for item in items:
            assert item.data is not None
            item.sha256 = hashlib.sha256(item.data).hexdigest()
        if not self._settings.dedupe.enabled:
            self._observe("dedupe", t0, items)
            return items
        if items and not self._dedupe.available:
            self._metrics.dedupe_unavailable.inc(len(items))
        candidates, self._waiting = self._waiting + items, []
        leaders: set[str] = set()  # content this pass will score; later copies reuse it in _judge
        live = []
        now = time.monotonic()
        for item in candidates:
            assert item.sha256 is not None
            if item.sha256 in leaders:
                live.append(item)
            elif (cached := self._dedupe.get(item.sha256, self._versions_key)) is not None:
                self._publish_cached(item, cached, "exact")
            elif self._dedupe.acquire(item.sha256, self._owner):
                item.leased = True
                leaders.add(item.sha256)
                live.append(item)
            elif item.wait_until is not None and now >= item.wait_until:
                # The other worker's lease outlived its own expiry check: score rather than wait forever.
                log.warning("dedupe.lease_wait_timeout", sha256=item.sha256, event_id=item.event.event_id)  # type: ignore[union-attr]
                leaders.add(item.sha256)
                live.append(item)
            else:
                if item.wait_until is None:
                    item.wait_until = now + self._settings.dedupe.lease_ms / 1000.0
                self._waiting.append(item)
        self._observe("dedupe", t0, items)
        return live

    @property
    def waiting(self) -> int:
        """Records deferred because another worker holds their content's lease."""
        return len(self._waiting)

    def drop_waiting(self, stale: Callable[[InRecord], bool]) -> None:
        """Forget deferred records of partitions this worker no longer owns."""
        self._waiting = [item for item in self._waiting if not stale(item.record)]

    def _decode(self, items: list[_Item]) -> list[_Item]:
        t0 = time.perf_counter()
        jobs = [ImageJob(key=item.event.event_id, data=item.data, sha256=item.sha256)  # type: ignore[union-attr,arg-type]
                for item in items]
        live = []
        for item, outcome in zip(items, self._scorer.decode(jobs), strict=True):
            item.outcome = outcome
            if outcome.error is not None:
                self._dead_letter(item, outcome.error)
            else:
                live.append(item)
        self._observe("decode", t0, items)
        return live

    def _reuse_near(self, items: list[_Item]) -> list[_Item]:
        settings = self._settings.dedupe
        if not (settings.enabled and settings.near):
            return items
        t0 = time.perf_counter()
        live = []
        for item in items:
            assert item.outcome is not None and item.outcome.image is not None
            item.phash = perceptual_hash(item.outcome.image.rgb)
            item.near = self._dedupe.find_near(item.phash, self._versions_key)
            if item.near is not None and item.near.sha256 != item.sha256 and settings.near_action == "reuse":
                self._publish_cached(item, item.near.cached, "near", near=item.near)
            else:
                live.append(item)
        self._observe("near_dedupe", t0, items)
        return live

    def _judge(self, items: list[_Item]) -> None:
        if not items:
            return
        t0 = time.perf_counter()
        # Inside one batch, later copies of the same content reuse the first copy's verdict.
        first: dict[str, _Item] = {}
        unique = []
        for item in items:
            if item.sha256 in first:
                continue
            first[item.sha256] = item  # type: ignore[index]
            unique.append(item)
        try:
            unique = self._judge_holding(unique)
        except Exception as exc:  # noqa: BLE001
            log.exception("worker.judge_failed", records=len(unique))
            for item in items:
                self._dead_letter(item, InternalError(f"detect: {type(exc).__name__}: {exc}"))
            return
        judged = {id(item) for item in unique}
        dropped = [item for item in items if id(first[item.sha256]) not in judged]  # type: ignore[index]
        if dropped:
            self._abandon(dropped)
        items = [item for item in items if id(first[item.sha256]) in judged]  # type: ignore[index]
        self._observe("detect", t0, items)
        for item in items:
            owner = first[item.sha256]  # type: ignore[index]
            verdict = owner.outcome.verdict  # type: ignore[union-attr]
            assert verdict is not None
            if owner is not item:
                self._metrics.dedupe_hits.labels("batch").inc()
                verdict = verdict.model_copy(update={"event_id": item.event.event_id,  # type: ignore[union-attr]
                                                     "duplicate_of": owner.event.event_id})  # type: ignore[union-attr]
            elif item.near is not None and item.near.sha256 != item.sha256:
                self._metrics.dedupe_hits.labels("near").inc()
                verdict = verdict.model_copy(update={"near_duplicate_of": _near(item.near)})
            verdict = verdict.model_copy(update={"timings_ms": {**item.timings_ms, **verdict.timings_ms}})
            self._publish(item, verdict)
            if owner is item and item.sha256 is not None:
                self._dedupe.put(item.sha256, self._versions_key, verdict, item.phash)
            if item.leased and item.sha256 is not None:
                self._dedupe.release(item.sha256, self._owner)

    def _judge_holding(self, unique: list[_Item]) -> list[_Item]:
        """Judge, holding through detector-server outages. Returns the items judged: all of them, or fewer
        when a rebalance took partitions away during the wait, or none when the worker stopped first."""
        while True:
            if self._outage is not None and self._outage.abandoning:
                return []
            try:
                self._scorer.judge([item.outcome for item in unique])  # type: ignore[misc]
            except DetectorsUnavailable as exc:
                if self._outage is None:
                    raise
                if not self._outage.hold(str(exc), self._scorer.available):
                    return []
                # Partitions revoked while we waited now belong to another worker, which will judge them.
                unique = [item for item in unique if self._is_current(item.record)]
                if not unique:
                    return []
                continue
            if self._outage is not None:
                self._outage.clear()
            return unique

    def _abandon(self, items: list[_Item]) -> None:
        """Leave records unpublished, hence uncommitted: the next owner of their partition gets them again."""
        log.warning("worker.records_abandoned", records=len(items))
        for item in items:
            if item.leased and item.sha256 is not None:
                self._dedupe.release(item.sha256, self._owner)

    # -- outputs --------------------------------------------------------------------------------------

    def _publish_cached(self, item: _Item, cached: CachedVerdict, kind: str, near: NearMatch | None = None) -> None:
        self._metrics.dedupe_hits.labels(kind).inc()
        original = Verdict.model_validate_json(cached.verdict_json)
        update: dict[str, object] = {
            "event_id": item.event.event_id,  # type: ignore[union-attr]
            "duplicate_of": cached.event_id,
            "content_sha256": item.sha256,
            "timings_ms": dict(item.timings_ms),
            "judged_at": datetime.now(UTC),
        }
        if near is not None:
            update["near_duplicate_of"] = _near(near)
        self._publish(item, original.model_copy(update=update))
        if item.leased and item.sha256 is not None:
            self._dedupe.release(item.sha256, self._owner)

    def _publish(self, item: _Item, verdict: Verdict) -> None:
        self._metrics.verdicts_out.labels(verdict.label).inc()
        self._publisher.verdict(item.record, verdict)

    def _dead_letter(self, item: _Item, exc: StreamguardError) -> None:
        record = item.record
        stage = exc.stage
        letter = DeadLetter(
            event_id=item.event.event_id if item.event else None,
            error_type=exc.error_type,
            message=str(exc) or exc.error_type,
            stage=stage,
            original_topic=record.topic,
            original_partition=record.partition,
            original_offset=record.offset,
            original_timestamp_ms=record.timestamp_ms,
            group_id=self._settings.worker.group_id,
            attempt=_attempt(record) + 1,
        )
        self._metrics.dead_letters.labels(letter.error_type).inc()
        log.info("worker.dead_letter", error_type=letter.error_type, stage=stage, offset=record.offset,
                 partition=record.partition, reason=letter.message[:200])
        if item.leased and item.sha256 is not None:
            self._dedupe.release(item.sha256, self._owner)
        self._publisher.dead_letter(record, letter)

    def _observe(self, stage: str, t0: float, items: list[_Item]) -> None:
        elapsed = time.perf_counter() - t0
        self._metrics.stage_seconds.labels(stage).observe(elapsed)
        for item in items:
            item.timings_ms[stage] = round(elapsed * 1000.0, 3)


def _near(match: NearMatch) -> NearDuplicate:
    return NearDuplicate(event_id=match.cached.event_id, content_sha256=match.sha256, distance=match.distance)


def _attempt(record: InRecord) -> int:
    """A dead letter replayed into the input carries its attempt count; count on from there."""
    for name, value in record.headers:
        if name == "sg-dlt-attempt":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
