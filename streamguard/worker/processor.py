"""One batch of records: parse -> fetch -> sha256 -> bank -> dedupe -> decode -> bank (PDQ) -> near dedupe ->
detect -> fuse -> tenant policy -> publish (and review).

Every record leaves as exactly one published message, a verdict or a dead letter; the publisher's
acknowledgement is what lets the loop commit it. Every stage runs under a per-record guard: an exception
in one record's path, whatever its kind, dead-letters that record with the stage it happened in, and the
rest of the batch goes on. Dedupe never blocks judging: with Redis down the store answers "not seen" and
everything is scored. Decoded pixels held at once are bounded by `intake.batch_pixel_budget`: a batch of
large images is decoded and judged in pieces.

Tenants: each event is decided under its tenant's policy and fusion weights, matched against its tenant's
hash banks, and deduplicated in its tenant's pool (`streamguard.tenants`). Content is still scored once per
batch whoever sent it: the scores depend on the bytes only, and each copy is decided from them for its own
tenant. A verdict never names another tenant's event.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from streamguard.config import Settings
from streamguard.decide import Decider, bank_verdict
from streamguard.dedupe.lease import LeaseKeeper
from streamguard.dedupe.phash import PerceptualHash, perceptual_hash
from streamguard.dedupe.store import CachedVerdict, DedupeStore, NearMatch, versions_key
from streamguard.errors import HeadersTooLarge, InternalError, RecordTooLarge, StreamguardError, UnreadableRecord
from streamguard.fetch import ImageFetcher, event_bytes
from streamguard.intake import ImageHeader, read_header
from streamguard.policy import policy_version
from streamguard.review.route import review_reason, review_request
from streamguard.schemas import DeadLetter, Evidence, ImageEvent, MatchedBank, NearDuplicate, Verdict
from streamguard.scoring import DetectorsUnavailable, ImageJob, Outcome, Scorer
from streamguard.tenants import DEFAULT_TENANT, Tenant, Tenants
from streamguard.wire import parse_event
from streamguard.worker.metrics import WorkerMetrics
from streamguard.worker.outage import OutageGate
from streamguard.worker.publish import Sink
from streamguard.worker.records import InRecord

if TYPE_CHECKING:
    from streamguard.banks import BankMatch, BankStore

log = structlog.get_logger(__name__)

_MAX_REASON_CHARS = 2000
# Passed for ``banks`` by callers that did not choose: the banks the settings configure.
_FROM_SETTINGS: Any = object()


@dataclass
class _Item:
    record: InRecord
    event: ImageEvent | None = None
    tenant: Tenant | None = None
    dedupe_key: str = ""  # the tenant's pool in the dedupe store
    data: bytes | None = None
    sha256: str | None = None
    header: ImageHeader | None = None  # read to bound its piece, until it is decoded
    outcome: Outcome | None = None
    phash: PerceptualHash | None = None
    near: NearMatch | None = None
    leased: bool = False
    wait_until: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


class BatchProcessor:
    def __init__(self, settings: Settings, scorer: Scorer, dedupe: DedupeStore, fetcher: ImageFetcher,
                 publisher: Sink, metrics: WorkerMetrics, owner: str, outage: OutageGate | None = None,
                 is_current: Callable[[InRecord], bool] = lambda record: True,
                 banks: BankStore | None = _FROM_SETTINGS) -> None:
        """``outage``: where to hold while a detector's server is down (None: never hold, e.g. tests of
        other stages). ``is_current``: whether this worker still owns a record's partition. ``banks``: the
        hash banks matched before detection (default: those the settings configure; None: none)."""
        self._settings = settings
        self._tenants = Tenants(settings)
        self._decider = Decider(scorer.plugin_manager)
        self._owns_banks = banks is _FROM_SETTINGS
        self._banks: BankStore | None = _open_banks(settings) if banks is _FROM_SETTINGS else banks
        # PDQ is computed once after decoding for whoever needs it: near dedupe, bank matches, reviewers.
        self._need_phash = (settings.dedupe.enabled and settings.dedupe.near) or self._banks is not None \
            or settings.review.topic is not None
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
        close = getattr(self._banks, "close", None)
        if self._owns_banks and close is not None:
            close()

    def process(self, records: Sequence[InRecord]) -> None:
        items = [_Item(record) for record in records]
        live = self._each("parse", items, self._parse)
        live = self._fetch_all(live)
        live = self._each("bank", live, self._match_bank_exact)
        live = self._reuse_exact(live)
        for piece in self._pixel_pieces(live):
            piece = self._decode(piece)
            piece = self._each("bank_near", piece, self._hash_and_match_bank)
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
        item.tenant = self._tenants.resolve(parsed.event.tenant)
        item.dedupe_key = item.tenant.dedupe_key(self._versions_key)

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

    def _match_bank_exact(self, item: _Item) -> bool | None:
        """Content a subscribed bank holds by SHA-256 is answered before the cache: a bank is where a
        person's decision lives, and it must win over a model's cached verdict."""
        match = self._bank_match(item, None)
        if match is None:
            return True
        self._publish_bank(item, match)
        return False

    def _hash_and_match_bank(self, item: _Item) -> bool | None:
        """PDQ of the decoded image, then the banks again, now for near-duplicates, before any detector."""
        if not self._need_phash:
            return True
        assert item.outcome is not None and item.outcome.image is not None
        item.phash = perceptual_hash(item.outcome.image.rgb)
        match = self._bank_match(item, item.phash)
        if match is None:
            return True
        self._publish_bank(item, match)
        return False

    def _bank_match(self, item: _Item, phash: PerceptualHash | None) -> BankMatch | None:
        banks = item.tenant.banks if item.tenant is not None else ()
        if self._banks is None or not banks:
            return None
        try:
            return self._banks.match(item.sha256, phash, banks)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - like dedupe, banks fail open: the detectors still judge
            log.warning("bank.match_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            return None

    def _publish_bank(self, item: _Item, match: BankMatch) -> None:
        tenant = item.tenant
        assert tenant is not None and item.event is not None and item.sha256 is not None
        self._metrics.bank_hits.labels(match.kind, tenant.metric_label).inc()
        verdict = bank_verdict(item.event.event_id, item.sha256, tenant, match.label,
                               MatchedBank(bank=match.bank, kind=match.kind, distance=match.distance),
                               policy_version(tenant.policy), dict(item.timings_ms))
        self._publish(item, verdict)
        self._release(item)

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
        leaders: set[tuple[str, str]] = set()  # (content, pool) this pass will score; copies reuse it in _judge
        now = time.monotonic()

        def reuse(item: _Item) -> bool | None:
            sha = item.sha256
            assert sha is not None
            if (sha, item.dedupe_key) in leaders:
                return True
            cached = self._dedupe.get(sha, item.dedupe_key)
            verdict = self._readable(cached)
            if cached is not None and verdict is not None:
                self._publish_cached(item, cached, verdict, "exact")
                return False
            if any(leader == sha for leader, _ in leaders):
                # Another tenant's copy is being scored in this pass: ride along (scores are the content's).
                leaders.add((sha, item.dedupe_key))
                return True
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
            leaders.add((sha, item.dedupe_key))
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
                group[0].header = read_header(group[0].data, self._settings.intake,  # type: ignore[arg-type]
                                              self._scorer.decode_side)
                pixels = group[0].header.decoded_pixels
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
        """The piece decoded together (on the scorer's decode threads); bad bytes dead-letter their record.
        An unexpected failure (a MemoryError, a decoder bug) fails the whole call: the piece is then decoded
        one image at a time, so that only the image that fails is dead-lettered."""
        def job(item: _Item, header: ImageHeader | None) -> ImageJob:
            return ImageJob(key=item.event.event_id, data=item.data, sha256=item.sha256,  # type: ignore[union-attr,arg-type]
                            header=header)

        def decoded(item: _Item) -> None:
            if item.outcome is None:  # one image at a time, its header read again: the batch's may be spent
                (item.outcome,) = self._scorer.decode([job(item, None)])
            if item.outcome.error is not None:
                raise item.outcome.error

        t0 = time.perf_counter()
        # Handed over and forgotten here: a header left on an item would keep its decoded pixels (Pillow's
        # image becomes the RGB one) past its piece, and pieces exist to bound those.
        headers = [item.header for item in items]
        for item in items:
            item.header = None
        try:
            outcomes = self._scorer.decode([job(item, header) for item, header in zip(items, headers, strict=True)])
        except Exception as exc:  # noqa: BLE001 - retried one by one below, under the per-record guard
            log.warning("worker.decode_batch_failed", records=len(items), error=f"{type(exc).__name__}: {exc}")
        else:
            for item, outcome in zip(items, outcomes, strict=True):
                item.outcome = outcome
        live = [item for item in items if self._guarded("decode", item, decoded) is not False]
        self._observe("decode", t0, items)
        return live

    def _reuse_near(self, items: list[_Item]) -> list[_Item]:
        settings = self._settings.dedupe
        if not (settings.enabled and settings.near):
            return items

        def near(item: _Item) -> bool | None:
            if item.phash is None:
                return True
            match = self._dedupe.find_near(item.phash, item.dedupe_key)
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
            remembered: set[str] = set()
            for item in group:
                first_in_pool = item.dedupe_key not in remembered
                remembered.add(item.dedupe_key)
                self._guarded("publish", item, lambda item, owner=owner, verdict=outcome, first=first_in_pool:
                              self._finish(item, owner, verdict, first))
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

    def _finish(self, item: _Item, owner: _Item, verdict: Verdict, remember: bool) -> bool:
        """Publish ``item``'s verdict (scored for ``owner``, decided again for ``item``'s tenant), then
        remember it in the item's pool when ``remember`` (the first copy there)."""
        assert item.tenant is not None and owner.tenant is not None
        if owner is not item:
            self._metrics.dedupe_hits.labels("batch").inc()
            same_tenant = owner.tenant.name == item.tenant.name
            verdict = verdict.model_copy(update={
                "event_id": item.event.event_id,  # type: ignore[union-attr]
                "duplicate_of": owner.event.event_id if same_tenant else None})  # type: ignore[union-attr]
        elif item.near is not None and item.near.sha256 != item.sha256:
            self._metrics.dedupe_hits.labels("near").inc()
            verdict = verdict.model_copy(update={"near_duplicate_of": self._near(item.near, item.tenant)})
        verdict = self._decider.decide(verdict, item.tenant, judged=owner.outcome.judgement,  # type: ignore[union-attr]
                                       changes={"timings_ms": {**item.timings_ms, **verdict.timings_ms}})
        # A tenant's copies of one content go to review once; later ones are duplicates of it.
        self._publish(item, verdict, review=verdict.duplicate_of is None)
        # Published: from here on a failure must not dead-letter the record too (two outcomes for one).
        try:
            if owner is item and verdict.degraded:
                # A verdict without some detector must not answer for this content once it recovers.
                self._metrics.degraded_verdicts.inc()
            elif remember and not verdict.degraded:
                self._dedupe.put(item.sha256, item.dedupe_key, verdict, item.phash)  # type: ignore[arg-type]
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
        tenant = item.tenant
        assert tenant is not None
        self._metrics.dedupe_hits.labels(kind).inc()
        same_tenant = _tenant_name(cached.tenant) == tenant.name
        update: dict[str, object] = {
            "event_id": item.event.event_id,  # type: ignore[union-attr]
            # From a shared pool, another tenant's event stays unnamed: the content hash says what matched.
            "duplicate_of": cached.event_id if same_tenant else None,
            "content_sha256": item.sha256,
            "timings_ms": dict(item.timings_ms),
            "judged_at": datetime.now(UTC),
        }
        if near is not None:
            update["near_duplicate_of"] = self._near(near, tenant)
        verdict = original.model_copy(update=update)
        # Decided again from the cached scores every time, not only for another tenant or other thresholds:
        # the fusion's weights and calibration are not in the cache key, and fusing is arithmetic, so a
        # change in any of them reaches cached content at once without running a detector.
        evidence = [] if same_tenant else [Evidence(kind="shared_cache", name="dedupe",
                                                    detail={"content_sha256": cached.sha256})]
        verdict = self._decider.decide(verdict, tenant, evidence)
        self._publish(item, verdict)
        self._release(item)

    def _publish(self, item: _Item, verdict: Verdict, review: bool = False) -> None:
        """Publish ``verdict``; with ``review``, also to the review topic when the settings route it there.
        Cached answers are not sent again: their content went to review when it was judged."""
        tenant_label = item.tenant.metric_label if item.tenant is not None else DEFAULT_TENANT
        self._metrics.verdicts_out.labels(verdict.label, verdict.decided_by, tenant_label).inc()
        reason = review_reason(verdict, self._settings.review) if review else None
        if reason is None:
            self._publisher.verdict(item.record, verdict)
            return
        assert item.event is not None
        self._metrics.review_requests.labels(reason, tenant_label).inc()
        request = review_request(verdict, reason, item.event, item.record, item.phash)
        self._publisher.verdict(item.record, verdict, review=request)

    def _near(self, match: NearMatch, tenant: Tenant) -> NearDuplicate:
        own = _tenant_name(match.cached.tenant) == tenant.name
        return NearDuplicate(event_id=match.cached.event_id if own else None, content_sha256=match.sha256,
                             distance=match.distance)

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
            tenant=item.tenant.name if item.tenant is not None else None,
        )
        self._metrics.dead_letters.labels(letter.error_type,
                                          item.tenant.metric_label if item.tenant is not None else "unknown").inc()
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
        ms = round(elapsed * 1000.0, 3)
        for item in items:
            item.timings_ms[stage] = ms


def _tenant_name(tenant: str | None) -> str:
    return DEFAULT_TENANT if tenant is None else tenant


def _open_banks(settings: Settings) -> BankStore | None:
    """The configured banks; with review routing on, the reviewers' banks too, so that a decision answers
    the next copy before any detector runs."""
    from streamguard.banks import open_banks

    review = settings.review
    if review.topic is not None:
        definitions = {review.bank_ai: "ai_generated", review.bank_real: "real", **settings.banks.definitions}
        settings = settings.model_copy(update={"banks": settings.banks.model_copy(update={"definitions": definitions})})
    return open_banks(settings)


def _attempt(record: InRecord) -> int:
    """A dead letter replayed into the input carries its attempt count; count on from there."""
    for name, value in record.headers:
        if name == "sg-dlt-attempt":
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0
