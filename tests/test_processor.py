"""`BatchProcessor` without a broker: records in, one outcome per record out (bytewax's testing
source/sink pattern). Delivery, rebalances and faults of the whole worker are tested against the real
broker in test_worker.py and test_poison.py; the dedupe cases here use the session's real Redis."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
from PIL import Image

from images import encode, noise, solid
from streamguard.config import Settings, load_settings
from streamguard.dedupe import NullDedupe
from streamguard.dedupe.lease import LeaseKeeper
from streamguard.dedupe.redis_store import RedisDedupe
from streamguard.dedupe.store import DedupeStore, versions_key
from streamguard.devstack import Service
from streamguard.fetch import ImageFetcher
from streamguard.intake import estimate_decoded_pixels
from streamguard.plugins import build_plugin_manager
from streamguard.schemas import ImageEvent
from streamguard.scoring import Scorer
from streamguard.wire import encode_event
from streamguard.worker.metrics import WorkerMetrics
from streamguard.worker.processor import BatchProcessor
from streamguard.worker.publish import ListPublisher
from streamguard.worker.records import InRecord

FAULT_GRAY = 13  # streamguard_testdetector.faults: fusing this gray raises MemoryError


class Pipeline:
    def __init__(self, settings: Settings, dedupe: DedupeStore | None = None) -> None:
        self.settings = settings
        self.scorer = Scorer(settings, build_plugin_manager(settings.plugins)).start()
        self.sink = ListPublisher(settings.worker)
        self.metrics = WorkerMetrics()
        self.dedupe = dedupe or NullDedupe()
        self.processor = BatchProcessor(settings, self.scorer, self.dedupe,
                                        ImageFetcher(settings.fetch, settings.intake.max_bytes), self.sink,
                                        self.metrics, owner=f"test-{uuid.uuid4().hex[:6]}")
        self._offset = 0

    def run(self, *records: tuple[bytes | None, list[tuple[str, bytes]]]) -> list[InRecord]:
        batch = []
        for value, headers in records:
            batch.append(InRecord("in", 0, self._offset, 0, None, value, tuple(headers)))
            self._offset += 1
        self.processor.process(batch)
        return batch

    def metric(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        return 0.0 if value is None else value

    def close(self) -> None:
        self.processor.close()
        self.scorer.close()


def event(event_id: str, image: bytes, encoding: str = "binary") -> tuple[bytes, list[tuple[str, bytes]]]:
    return encode_event(ImageEvent(event_id=event_id, image=image), encoding)  # type: ignore[arg-type]


def png(value: int, size: tuple[int, int] = (48, 40)) -> bytes:
    return encode(solid(value, size), "PNG")


@pytest.fixture
def pipeline(settings: Settings) -> Iterator[Pipeline]:
    p = Pipeline(settings)
    yield p
    p.close()


def test_every_record_gets_exactly_one_outcome(pipeline: Pipeline) -> None:
    records = pipeline.run(event("good", png(250)), (b"{not json", []), event("bad", b"\x89PNG broken"),
                           (None, []))
    assert pipeline.sink.outcomes() == {0: "verdict", 1: "SchemaError", 2: "UnsupportedFormat", 3: "SchemaError"}
    assert len(pipeline.sink.messages) == len(records)
    ((_, verdict),) = pipeline.sink.verdicts
    assert verdict.event_id == "good" and verdict.label == "ai_generated" and not verdict.degraded


def test_unknown_event_fields_are_dropped_and_counted_unless_strict(settings: Settings) -> None:
    value, _ = event("newer", png(250), "json")
    newer = json.dumps({**json.loads(value), "moderation_hint": "x", "region": "eu"}).encode()
    tolerant = Pipeline(settings)
    strict = Pipeline(load_settings(worker={"strict_events": True}))
    try:
        tolerant.run((newer, []))
        strict.run((newer, []))
    finally:
        tolerant.close()
        strict.close()
    assert tolerant.sink.outcomes() == {0: "verdict"}
    assert tolerant.metric("streamguard_event_unknown_fields_total") == 2
    ((_, letter),) = strict.sink.dead_letters
    assert letter.error_type == "SchemaError" and "moderation_hint" in letter.message


def test_a_header_bomb_is_refused_and_its_dead_letter_stays_small(pipeline: Pipeline) -> None:
    value, headers = event("bomb", png(250))
    bomb = [*headers, ("x-bomb", b"\x00" * (3 * 1024 * 1024)), ("x-small", b"kept")]
    pipeline.run((value, bomb))
    ((_, letter),) = pipeline.sink.dead_letters
    assert letter.error_type == "HeadersTooLarge" and letter.stage == "parse"
    (message,) = pipeline.sink.messages
    copied = dict(message.headers)
    assert copied["x-small"] == b"kept" and "x-bomb" not in copied
    assert copied["sg-dlt-headers-omitted"].startswith(b"1 headers, ")
    size = sum(len(k) + len(v) for k, v in message.headers) + len(message.value)
    assert size < pipeline.settings.worker.dead_letter_max_header_bytes + len(value) + 16 * 1024


def test_an_unreadable_record_is_a_dead_letter_naming_its_offset(pipeline: Pipeline) -> None:
    record = InRecord.unreadable_at(InRecord("in", 3, 0, 0, None, None, ()).tp, 41, 0,
                                    "CorruptRecordError: Found invalid record structure")
    pipeline.processor.process([record])
    ((_, letter),) = pipeline.sink.dead_letters
    assert (letter.error_type, letter.stage) == ("UnreadableRecord", "consume")
    assert (letter.original_partition, letter.original_offset) == (3, 41)
    assert "CorruptRecordError" in letter.message


def test_one_image_failing_in_detect_dead_letters_only_that_image(pipeline: Pipeline,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_TEST_FAULTS", "1")
    pipeline.run(event("a", png(250)), event("culprit", png(FAULT_GRAY)), event("b", png(10)),
                 event("culprit-copy", png(FAULT_GRAY)))
    assert pipeline.sink.outcomes() == {0: "verdict", 1: "InternalError", 2: "verdict", 3: "InternalError"}
    letters = {letter.event_id: letter for _, letter in pipeline.sink.dead_letters}
    assert letters["culprit"].stage == "detect" and "MemoryError" in letters["culprit"].message


def test_one_image_failing_in_decode_dead_letters_only_that_image(pipeline: Pipeline,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding a piece together fails as a whole on an unexpected error: it is redone one image at a time."""
    import streamguard.scoring as scoring

    culprit = png(77)
    decode = scoring.decode_image

    def failing(data, *args, **kwargs):  # type: ignore[no-untyped-def]
        if data == culprit:
            raise MemoryError("decoder ran out")
        return decode(data, *args, **kwargs)

    monkeypatch.setattr(scoring, "decode_image", failing)
    pipeline.run(event("a", png(250)), event("culprit", culprit), event("b", png(10)))
    assert pipeline.sink.outcomes() == {0: "verdict", 1: "InternalError", 2: "verdict"}
    ((_, letter),) = pipeline.sink.dead_letters
    assert letter.stage == "decode" and "MemoryError" in letter.message


def test_a_failed_detector_gives_a_degraded_verdict_that_is_never_cached(redis_service: Service) -> None:
    settings = load_settings(redis={"url": f"redis://{redis_service.address}/0"},
                             dedupe={"namespace": f"p{uuid.uuid4().hex[:8]}"},
                             detectors={"options": {"brightness": {"fail_above": 0.9}}})
    store = RedisDedupe(settings.dedupe, settings.redis)
    pipeline = Pipeline(settings, store)
    try:
        bright = png(250)
        pipeline.run(event("first", bright))
        pipeline.run(event("again", bright))
    finally:
        pipeline.close()
    (_, first), (_, again) = pipeline.sink.verdicts
    assert first.degraded and first.failed_detectors == ["brightness"]
    assert again.duplicate_of is None  # scored again, not answered from the cache
    assert pipeline.metric("streamguard_degraded_verdicts_total") == 2


def test_an_unreadable_cached_verdict_is_a_miss_and_is_rescored(redis_service: Service) -> None:
    settings = load_settings(redis={"url": f"redis://{redis_service.address}/0"},
                             dedupe={"namespace": f"p{uuid.uuid4().hex[:8]}"})
    store = RedisDedupe(settings.dedupe, settings.redis)
    pipeline = Pipeline(settings, store)
    bright = png(250)
    try:
        pipeline.run(event("first", bright))
        ((_, first),) = pipeline.sink.verdicts
        key = versions_key(pipeline.scorer.model_versions, pipeline.scorer.policy_version)
        # A newer release's verdict (one field this version does not know), as in a rolling upgrade.
        poisoned = {**json.loads(first.model_dump_json()), "review_queue": "urgent"}
        store._client.set(f"{settings.dedupe.namespace}:v:{key}:{first.content_sha256}", json.dumps(poisoned))
        pipeline.run(event("second", bright))
        pipeline.run(event("third", bright))
    finally:
        pipeline.close()
    labels = [(v.event_id, v.duplicate_of) for _, v in pipeline.sink.verdicts]
    assert labels == [("first", None), ("second", None), ("third", "second")]
    assert pipeline.metric("streamguard_dedupe_cache_unreadable_total") == 1


def test_a_change_in_fusion_alone_reaches_cached_verdicts(redis_service: Service) -> None:
    """Same models, same thresholds, a new fused calibration: the cache still answers (no detector runs
    again), but under the fusion in force now, not the one that was in force when the content was judged."""
    namespace = f"p{uuid.uuid4().hex[:8]}"
    bright = png(250)
    verdicts = []
    for bias, event_id in ((-20.0, "before"), (20.0, "after")):
        settings = load_settings(redis={"url": f"redis://{redis_service.address}/0"},
                                 dedupe={"namespace": namespace}, fusion={"bias": bias})
        pipeline = Pipeline(settings, RedisDedupe(settings.dedupe, settings.redis))
        try:
            pipeline.run(event(event_id, bright))
        finally:
            pipeline.close()
        ((_, verdict),) = pipeline.sink.verdicts
        verdicts.append(verdict)
    before, after = verdicts
    assert after.duplicate_of == "before" and after.scores == before.scores
    assert (before.label, after.label) == ("real", "ai_generated")
    assert after.explanation is not None and after.explanation.calibration_bias == 20.0


def test_decoded_pixels_per_piece_stay_under_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    images = [encode(noise((1000, 1000), seed=i), "PNG") for i in range(5)]
    with Scorer(load_settings(), build_plugin_manager(load_settings().plugins)) as probe:
        held = estimate_decoded_pixels(images[0], load_settings().intake, probe.decode_side)
    assert held > 0
    pipeline = Pipeline(load_settings(intake={"batch_pixel_budget": int(2.5 * held)}))
    judged: list[int] = []
    judge = pipeline.scorer.judge
    monkeypatch.setattr(pipeline.scorer, "judge", lambda decoded: (judged.append(len(decoded)), judge(decoded))[1])
    try:
        pipeline.run(*(event(f"e{i}", data) for i, data in enumerate(images)), event("copy", images[0]))
    finally:
        pipeline.close()
    assert len(pipeline.sink.verdicts) == 6
    assert judged == [2, 2, 1]  # the copy of e0 rides with it and reuses its verdict
    duplicates = {v.event_id: v.duplicate_of for _, v in pipeline.sink.verdicts}
    assert duplicates == {"e0": None, "e1": None, "e2": None, "e3": None, "e4": None, "copy": "e0"}


def test_a_live_holder_keeps_its_lease_and_a_dead_one_loses_it_fast(redis_service: Service) -> None:
    settings = load_settings(redis={"url": f"redis://{redis_service.address}/0"},
                             dedupe={"namespace": f"p{uuid.uuid4().hex[:8]}", "lease_ms": 300})
    store = RedisDedupe(settings.dedupe, settings.redis)
    sha = "a" * 64
    assert store.acquire(sha, "holder")
    with LeaseKeeper(store, "holder", [sha], interval_s=0.1):
        time.sleep(1.0)  # three lease times: only renewal keeps it
        assert not store.acquire(sha, "other")
    time.sleep(0.5)  # no renewal, as after a SIGKILL: gone within one lease time
    assert store.acquire(sha, "other")
    store.close()


def test_mpo_phone_photos_are_judged(pipeline: Pipeline) -> None:
    import io

    primary, preview = solid(250, (64, 48)), solid(10, (32, 24))
    buf = io.BytesIO()
    primary.save(buf, format="MPO", save_all=True, append_images=[preview])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    pipeline.run(event("phone", buf.getvalue()))
    ((_, verdict),) = pipeline.sink.verdicts
    assert verdict.label == "ai_generated"  # the bright primary image, not the dark second frame


class _StoreFailingOn(NullDedupe):
    """A store with a bug that shows for one content hash only."""

    def __init__(self, sha256: str) -> None:
        super().__init__()
        self._sha256 = sha256

    def get(self, sha256: str, versions_key: str):  # type: ignore[no-untyped-def]
        if sha256 == self._sha256:
            raise RuntimeError("store bug")
        return None


def test_a_failure_in_dedupe_dead_letters_only_that_record(settings: Settings) -> None:
    import hashlib

    culprit = png(77)
    pipeline = Pipeline(settings, _StoreFailingOn(hashlib.sha256(culprit).hexdigest()))
    try:
        pipeline.run(event("a", png(250)), event("culprit", culprit), event("b", png(10)))
    finally:
        pipeline.close()
    assert pipeline.sink.outcomes() == {0: "verdict", 1: "InternalError", 2: "verdict"}
    ((_, letter),) = pipeline.sink.dead_letters
    assert letter.stage == "dedupe" and "store bug" in letter.message


def test_the_default_tenant_reuses_the_scorers_judgement_and_others_are_decided_again(settings: Settings) -> None:
    """Fusion and policy run once per content for the default tenant (its settings are the scorer's), and
    again for a tenant with thresholds of its own; both verdicts are what deciding from scratch gives."""
    from streamguard.decide import Decider
    from streamguard.hookspecs import hookimpl
    from streamguard.tenants import Tenants

    class CountFusions:
        calls = 0

        @hookimpl(wrapper=True)
        def fuse_scores(self, scores, settings):  # type: ignore[no-untyped-def]
            CountFusions.calls += 1
            return (yield)

    settings = settings.model_copy(update={"tenants": load_settings(tenants={"strict": {"ai_threshold": 1.0}}).tenants})
    pipeline = Pipeline(settings)
    try:
        pipeline.scorer.plugin_manager.register(CountFusions())
        value, headers = encode_event(ImageEvent(event_id="strict-1", image=png(250), tenant="strict"), "binary")
        pipeline.run(event("default-1", png(250)), (value, headers))
    finally:
        pipeline.close()
    verdicts = {verdict.event_id: verdict for _, verdict in pipeline.sink.verdicts}
    assert CountFusions.calls == 2  # the scorer's, then the strict tenant's; none for the default tenant
    assert verdicts["default-1"].label == "ai_generated" and verdicts["strict-1"].label != "ai_generated"
    tenants, decider = Tenants(settings), Decider(pipeline.scorer.plugin_manager)
    for event_id, tenant in (("default-1", None), ("strict-1", "strict")):
        published = verdicts[event_id]
        again = decider.decide(published, tenants.resolve(tenant))
        assert (again.label, again.probability, again.explanation) == (published.label, published.probability,
                                                                       published.explanation)
