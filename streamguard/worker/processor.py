"""One batch of records: parse -> fetch -> sha256 -> dedupe -> decode -> detect -> fuse -> publish.

Every record leaves as exactly one published message, a verdict or a dead letter; the publisher's
acknowledgement is what lets the loop commit it. Every stage runs under a per-record guard: an exception
in one record's path, whatever its kind, dead-letters that record with the stage it happened in, and the
rest of the batch goes on. Dedupe never blocks judging: with Redis down the store answers "not seen" and
everything is scored. Decoded pixels held at once are bounded by `intake.batch_pixel_budget`: a batch of
large images is decoded and judged in pieces.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from pydantic import ValidationError

from streamguard.config import Settings
from streamguard.dedupe.lease import LeaseKeeper
from streamguard.dedupe.phash import PerceptualHash, perceptual_hash
from streamguard.dedupe.store import CachedVerdict, DedupeStore, NearMatch, versions_key
from streamguard.errors import HeadersTooLarge, InternalError, RecordTooLarge, StreamguardError, UnreadableRecord
from streamguard.fetch import ImageFetcher, event_bytes
from streamguard.intake import estimate_decoded_pixels
from streamguard.schemas import DeadLetter, ImageEvent, NearDuplicate, Verdict
from streamguard.scoring import DetectorsUnavailable, ImageJob, Outcome, Scorer
from streamguard.wire import parse_event
from streamguard.worker.metrics import WorkerMetrics
from streamguard.worker.outage import OutageGate
from streamguard.worker.publish import Sink
from streamguard.worker.records import InRecord

log = structlog.get_logger(__name__)

_MAX_REASON_CHARS = 2000


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
                 publisher: Sink, metrics: WorkerMetrics, owner: str, outage: OutageGate | None = None,
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
        live = self._each("parse", items, self._parse)
        live = self._fetch_all(live)
        live = self._reuse_exact(live)
        for piece in self._pixel_pieces(live):
            piece = self._decode(piece)
            piece = self._reuse_near(piece)
            self._judge(piece)

    # -- stages ---------------------------------------------------------------------------------------

    def _each(self, stage: str, items: list[_Item], fn: Callable[[_Item], bool | None]) -> list[_Item]:
        """``fn`` on each item under the per-record guard; the items it did not finish or dead-letter
        (it returns False once it published the item's outcome) go on."""
        t0 = time.perf_counter()
        live = []
        for item in items:
            if self._guarded(stage, item, fn) is not False:
                live.append(item)
        self._observe(stage, t0, items)
        return live

    def _guarded(self, stage: str, item: _Item, fn: Callable[[_Item], bool | None]) -> bool | None:
        """``fn(item)``; on an exception the item is dead-lettered and False returned."""
        try:
            return fn(item)
        except StreamguardError as exc:
            self._dead_letter(item, exc)
        except Exception as exc:  # noqa: BLE001 - one record's bug (or MemoryError) must not stop the stream
            log.exception("worker.record_failed", stage=stage, offset=item.record.offset,
                          partition=item.record.partition)
            self._dead_letter(item, InternalError(f"{stage}: {type(exc).__name__}: {exc}", stage=stage))
        return False

    def _parse(self, item: _Item) -> None:
        record, worker = item.record, self._settings.worker
        if record.unreadable is not None:
            raise UnreadableRecord(record.unreadable)
        if record.header_bytes > worker.max_header_bytes:
            raise HeadersTooLarge(f"{len(record.headers)} headers of {record.header_bytes} bytes exceed the "
                                  f"limit of {worker.max_header_bytes}")
        if record.value is not None and len(record.value) > worker.max_record_bytes:
            raise RecordTooLarge(f"record of {len(record.value)} bytes exceeds the limit of {worker.max_record_bytes}")
        parsed = parse_event(record.value, list(record.headers), strict=worker.strict_events)
        if parsed.unknown_fields:
            self._metrics.unknown_fields.inc(len(parsed.unknown_fields))
            log.debug("worker.unknown_fields", fields=list(parsed.unknown_fields), offset=record.offset)
        item.event = parsed.event

    def _fetch_all(self, items: list[_Item]) -> list[_Item]:
        t0 = time.perf_counter()
        # Only URI events need the pool: a hand-off per inline image costs more than it saves.
        futures = {
            id(item): self._fetch_pool.submit(event_bytes, item.event, self._fetcher)
            for item in items if item.event is not None and item.event.uri
        }

        def fetched(item: _Item) -> None:
            future = futures.get(id(item))
            item.data = future.result() if future is not None else item.event.image  # type: ignore[union-attr]
            item.sha256 = hashlib.sha256(item.data).hexdigest()  # type: ignore[arg-type]

        live = [item for item in items if self._guarded("fetch", item, fetched) is not False]
        self._observe("fetch", t0, items)
        return live

    def _reuse_exact(self, items: list[_Item]) -> list[_Item]:
        """Exact duplicates by sha256: the cached verdict if there is one, else an in-flight lease so that
        two workers never score the same content at once. Content leased by another worker is deferred,
        not waited for, so one slow copy elsewhere does not stall this worker's other records."""
        if not self._settings.dedupe.enabled:
            return items
        t0 = time.perf_counter()
        if items and not self._dedupe.available:
            self._metrics.dedupe_unavailable.inc(len(items))
        candidates, self._waiting = self._waiting + items, []
        leaders: set[str] = set()  # content this pass will score; later copies reuse it in _judge
        now = time.monotonic()

        def reuse(item: _Item) -> bool | None:
            sha = item.sha256
            assert sha is not None
            if sha in leaders:
                return True
            cached = self._dedupe.get(sha, self._versions_key)
            verdict = self._readable(cached)
            if cached is not None and verdict is not None:
                self._publish_cached(item, cached, verdict, "exact")
                return False
            if self._dedupe.acquire(sha, self._owner):
                item.leased = True
            elif item.wait_until is None:
                item.wait_until = now + self._settings.dedupe.lease_wait_max_s
                self._waiting.append(item)
                return False
            elif now < item.wait_until:
                self._waiting.append(item)
                return False
            else:
                # The other worker has held its lease for too long: score rather than wait forever.
                log.warning("dedupe.lease_wait_timeout", sha256=sha, event_id=item.event.event_id)  # type: ignore[union-attr]
            leaders.add(sha)
            return True

        live = [item for item in candidates if self._guarded("dedupe", item, reuse) is not False]
        self._observe("dedupe", t0, items)
        return live

    @property
    def waiting(self) -> int:
        """Records deferred because another worker holds their content's lease."""
        return len(self._waiting)

    def drop_waiting(self, stale: Callable[[InRecord], bool]) -> None:
        """Forget deferred records of partitions this worker no longer owns."""
        self._waiting = [item for item in self._waiting if not stale(item.record)]

    def _pixel_pieces(self, items: list[_Item]) -> Iterator[list[_Item]]:
        """Consecutive pieces whose decoded pixels fit the budget (a lone image over it is a piece of its
        own); copies of the same content stay in one piece, so they share one judgement."""
        budget = self._settings.intake.batch_pixel_budget
        groups: dict[str, list[_Item]] = {}
        for item in items:
            groups.setdefault(item.sha256, []).append(item)  # type: ignore[arg-type]
        piece: list[_Item] = []
        used = 0
        for group in groups.values():
            try:
                pixels = estimate_decoded_pixels(group[0].data, self._settings.intake,  # type: ignore[arg-type]
                                                 self._scorer.decode_side)
            except Exception:  # noqa: BLE001 - the decode stage reports what is wrong with the bytes
                pixels = 0
            if piece and used + pixels > budget:
                yield piece
                piece, used = [], 0
            piece += group
            used += pixels
        if piece:
            yield piece

    def _decode(self, items: list[_Item]) -> list[_Item]:
        def decode(item: _Item) -> None:
            job = ImageJob(key=item.event.event_id, data=item.data, sha256=item.sha256)  # type: ignore[union-attr,arg-type]
            (item.outcome,) = self._scorer.decode([job])
            if item.outcome.error is not None:
                raise item.outcome.error

        return self._each("decode", items, decode)

    def _reuse_near(self, items: list[_Item]) -> list[_Item]:
        settings = self._settings.dedupe
        if not (settings.enabled and settings.near):
            return items

        def near(item: _Item) -> bool | None:
            assert item.outcome is not None and item.outcome.image is not None
            item.phash = perceptual_hash(item.outcome.image.rgb)
            match = self._dedupe.find_near(item.phash, self._versions_key)
            verdict = self._readable(match.cached if match is not None else None)
            item.near = match if verdict is not None else None
            if match is None or verdict is None or match.sha256 == item.sha256 or settings.near_action != "reuse":
                return True
            self._publish_cached(item, match.cached, verdict, "near", near=match)
            return False

        return self._each("near_dedupe", items, near)

    def _judge(self, items: list[_Item]) -> None:
        if not items:
            return
        t0 = time.perf_counter()
        # Inside one batch, later copies of the same content reuse the first copy's verdict.
        copies: dict[str, list[_Item]] = {}
        for item in items:
            copies.setdefault(item.sha256, []).append(item)  # type: ignore[arg-type]
        unique = [group[0] for group in copies.values()]
        leased = [item.sha256 for item in unique if item.leased]
        with LeaseKeeper(self._dedupe, self._owner, leased, self._settings.dedupe.lease_ms / 3000.0):  # type: ignore[arg-type]
            judged = self._judge_isolating(unique)
        for owner in unique:
            if id(owner) not in judged:
                self._abandon(copies[owner.sha256])  # type: ignore[index]
        self._observe("detect", t0, [item for owner in unique if id(owner) in judged for item in copies[owner.sha256]])  # type: ignore[index]
        for owner in unique:
            group = copies[owner.sha256]  # type: ignore[index]
            outcome = judged.get(id(owner))
            if outcome is None:
                continue
            if isinstance(outcome, Exception):
                for item in group:
                    self._dead_letter(item, InternalError(f"detect: {type(outcome).__name__}: {outcome}",
                                                          stage="detect"))
                continue
            for item in group:
                self._guarded("publish", item, lambda item, owner=owner, verdict=outcome: self._finish(item, owner, verdict))
            owner.outcome.image = None  # type: ignore[union-attr]  # the pixels are not needed any more

    def _judge_isolating(self, unique: list[_Item]) -> dict[int, Verdict | Exception]:
        """Judge ``unique``: id(item) -> its verdict, or the exception that stopped it alone. A failure
        of the whole batch (a MemoryError in one image's preparation, a bug in a plugin) is retried one
        image at a time, so only the image that fails is dead-lettered. Items left out were abandoned
        (the worker stopped, or their partition moved during an outage)."""
        try:
            done = self._judge_holding(unique)
            return {id(item): item.outcome.verdict for item in done}  # type: ignore[union-attr,misc]
        except DetectorsUnavailable as exc:  # no outage gate to hold at: one image alone fares no better
            return {id(item): exc for item in unique}
        except Exception as exc:  # noqa: BLE001
            if len(unique) == 1:
                log.exception("worker.judge_failed", offset=unique[0].record.offset)
                return {id(unique[0]): exc}
            log.warning("worker.judge_batch_failed", records=len(unique), error=f"{type(exc).__name__}: {exc}")
        results: dict[int, Verdict | Exception] = {}
        for item in unique:
            results.update(self._judge_isolating([item]))
        return results

    def _finish(self, item: _Item, owner: _Item, verdict: Verdict) -> bool:
        """Publish ``item``'s verdict (``owner``'s, reused by a copy), then remember it."""
        if owner is not item:
            self._metrics.dedupe_hits.labels("batch").inc()
            verdict = verdict.model_copy(update={"event_id": item.event.event_id,  # type: ignore[union-attr]
                                                 "duplicate_of": owner.event.event_id})  # type: ignore[union-attr]
        elif item.near is not None and item.near.sha256 != item.sha256:
            self._metrics.dedupe_hits.labels("near").inc()
            verdict = verdict.model_copy(update={"near_duplicate_of": _near(item.near)})
        verdict = verdict.model_copy(update={"timings_ms": {**item.timings_ms, **verdict.timings_ms}})
        self._publish(item, verdict)
        # Published: from here on a failure must not dead-letter the record too (two outcomes for one).
        try:
            if owner is item and verdict.degraded:
                # A verdict without some detector must not answer for this content once it recovers.
                self._metrics.degraded_verdicts.inc()
            elif owner is item:
                self._dedupe.put(item.sha256, self._versions_key, verdict, item.phash)  # type: ignore[arg-type]
            self._release(item)
        except Exception:  # noqa: BLE001
            log.exception("worker.remember_failed", offset=item.record.offset)
        return False

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
            self._release(item)

    def _release(self, item: _Item) -> None:
        if item.leased and item.sha256 is not None:
            self._dedupe.release(item.sha256, self._owner)
            item.leased = False

    # -- outputs --------------------------------------------------------------------------------------

    def _readable(self, cached: CachedVerdict | None) -> Verdict | None:
        """The cached verdict, or None when this version cannot read it (a tampered cache, a newer
        release's verdict during a rolling upgrade): then the content is scored again, as on a miss."""
        if cached is None:
            return None
        try:
            return Verdict.model_validate_json(cached.verdict_json)
        except (ValidationError, ValueError) as exc:
            self._metrics.dedupe_cache_unreadable.inc()
            log.warning("dedupe.cache_unreadable", sha256=cached.sha256, error=str(exc)[:300])
            return None

    def _publish_cached(self, item: _Item, cached: CachedVerdict, original: Verdict, kind: str,
                        near: NearMatch | None = None) -> None:
        self._metrics.dedupe_hits.labels(kind).inc()
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
        self._release(item)

    def _publish(self, item: _Item, verdict: Verdict) -> None:
        self._metrics.verdicts_out.labels(verdict.label).inc()
        self._publisher.verdict(item.record, verdict)

    def _dead_letter(self, item: _Item, exc: StreamguardError) -> None:
        record = item.record
        stage = exc.stage
        letter = DeadLetter(
            event_id=item.event.event_id if item.event else None,
            error_type=exc.error_type,
            message=(str(exc) or exc.error_type)[:_MAX_REASON_CHARS],
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
        try:
            self._release(item)
        except Exception:  # noqa: BLE001 - the lease expires on its own; the dead letter must still go out
            log.exception("worker.release_failed", offset=record.offset)
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
                return max(0, int(value))
            except ValueError:
                return 0
    return 0
