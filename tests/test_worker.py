"""The worker against a real broker and a real Redis: what goes in comes out, exactly once or more."""

from __future__ import annotations

import json
import math
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from images import encode, noise, solid, truncated_jpeg
from stack import (
    Topics,
    WorkerProcess,
    committed_offsets,
    end_offsets,
    image_events,
    missing,
    produce,
    read_outcomes,
    wait_for_outcomes,
    worker_env,
)
from streamguard.devstack import Service, start_redis
from streamguard.schemas import ImageEvent
from streamguard.wire import encode_event
from streamguard_provenance import VERSION as PROVENANCE_VERSION


def _distinct_images(n: int, seed: int = 0) -> list[bytes]:
    return [encode(noise((48, 40), seed=seed * 10_000 + i), "PNG") for i in range(n)]


@pytest.fixture
def topics(kafka: Service) -> Topics:
    return Topics(kafka.address).create()


def _redis_url(service: Service) -> str:
    return f"redis://{service.address}/0"


def test_n_events_in_n_verdicts_out_and_duplicates_scored_once(topics: Topics, redis_service: Service,
                                                                tmp_path: Path) -> None:
    images = _distinct_images(20)
    bright = encode(solid(250), "PNG")
    events = image_events(images, "binary") + image_events([bright], "json", prefix="first")
    worker = WorkerProcess(worker_env(topics, _redis_url(redis_service)), tmp_path)
    try:
        sent = produce(topics, events)
        first = wait_for_outcomes(topics, sent)
        # The same content again, after the first verdict is cached: reused, not rescored.
        again = produce(topics, image_events([bright], "binary", prefix="again"))
        outcomes = wait_for_outcomes(topics, sent + again)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    assert not first.dead_letters
    ids = outcomes.verdict_ids()
    assert sorted(ids) == sorted([e[0] for e in events] + ["again-0"])  # exactly N, each with its id
    by_id = {v["event_id"]: v for v in outcomes.verdicts}
    assert by_id["first-0"]["label"] == "ai_generated" and by_id["first-0"]["duplicate_of"] is None
    dup = by_id["again-0"]
    assert dup["duplicate_of"] == "first-0"
    assert dup["content_sha256"] == by_id["first-0"]["content_sha256"]
    assert dup["scores"] == by_id["first-0"]["scores"]  # the cached scores: no detector ran again
    assert "detect" not in dup["timings_ms"]
    assert {s["detector"] for s in by_id["e-0"]["scores"]} == {"brightness", "provenance"}


def test_poison_events_go_to_the_dead_letter_topic(topics: Topics, tmp_path: Path) -> None:
    good = encode(solid(5), "PNG")
    oversized = b"\xff\xd8" + b"\x00" * (300 * 1024)
    uri_local = ImageEvent(event_id="uri-loopback", uri="http://127.0.0.1:9/secret.png")
    uri_unreachable = ImageEvent(event_id="uri-unreachable", uri="http://unreachable.invalid/a.png")
    records = [
        ("bad-json", b'{"event_id": "bad-json", "image": ', [("sg-encoding", b"json")]),
        ("schema", b'{"event_id": "schema", "image": "AAAA", "created_at": "yesterday"}', []),
        ("corrupt", truncated_jpeg(), [("sg-encoding", b"binary"), ("sg-event-id", b"corrupt")]),
        ("oversized", oversized, [("sg-encoding", b"binary"), ("sg-event-id", b"oversized")]),
        ("uri-unreachable", encode_event(uri_unreachable)[0], []),
        ("uri-loopback", encode_event(uri_local)[0], []),
        ("good", *encode_event(ImageEvent(event_id="good", image=good), "binary")),
    ]
    env = worker_env(topics, None, STREAMGUARD_WORKER__MAX_RECORD_BYTES=str(256 * 1024),
                     STREAMGUARD_WORKER__DEAD_LETTER_MAX_VALUE_BYTES=str(100 * 1024),
                     STREAMGUARD_FETCH__TIMEOUT_S="2")
    worker = WorkerProcess(env, tmp_path)
    try:
        sent = produce(topics, records)
        outcomes = wait_for_outcomes(topics, sent)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    assert outcomes.verdict_ids() == ["good"]
    letters = {(d["original_partition"], d["original_offset"]): d for d in outcomes.dead_letters}
    reasons = {s.event_id: letters[(s.partition, s.offset)] for s in sent if s.event_id != "good"}
    assert reasons["bad-json"]["error_type"] == "SchemaError" and "JSON" in reasons["bad-json"]["message"]
    assert reasons["schema"]["error_type"] == "SchemaError" and "created_at" in reasons["schema"]["message"]
    assert reasons["corrupt"]["error_type"] == "CorruptImage"
    assert reasons["oversized"]["error_type"] == "RecordTooLarge"
    assert reasons["oversized"]["value_len"] == 0  # too big to repeat in the letter; the headers say so
    assert reasons["oversized"]["headers"]["sg-dlt-value-omitted-bytes"] == str(len(oversized))
    assert reasons["uri-unreachable"]["error_type"] == "FetchFailed"
    assert reasons["uri-loopback"]["error_type"] == "FetchRefused"
    for letter in reasons.values():
        headers = letter["headers"]
        assert headers["sg-dlt-original-topic"] == topics.input
        assert headers["sg-dlt-group"] == topics.group and headers["sg-dlt-attempt"] == "1"
        assert {"sg-dlt-original-partition", "sg-dlt-original-offset", "sg-dlt-original-timestamp",
                "sg-dlt-exception-class", "sg-dlt-exception-message"} <= set(headers)
    assert reasons["corrupt"]["value_len"] > 0  # the original bytes, for replay


def test_sigkill_mid_stream_loses_nothing(topics: Topics, tmp_path: Path) -> None:
    # ~100 records left at 0.25 s per detector call of 16: the kill lands with work unfinished even when
    # the harness's checks of the verdict topic are slow.
    env = worker_env(topics, None, STREAMGUARD_DETECTORS__OPTIONS='{"brightness": {"delay_s": 0.25}}')
    sent = produce(topics, image_events(_distinct_images(120, seed=1)))
    worker = WorkerProcess(env, tmp_path, "doomed")
    try:
        deadline = time.monotonic() + 90
        while len(read_outcomes(topics).verdicts) < 20:
            assert time.monotonic() < deadline, worker.log_path.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        worker.kill()
    assert missing(sent, read_outcomes(topics)), "the worker finished before it was killed"
    restarted = WorkerProcess(env, tmp_path, "restarted")
    try:
        outcomes = wait_for_outcomes(topics, sent, timeout=120)
    finally:
        restarted.signal(signal.SIGTERM)
        assert restarted.wait(60) == 0
    ids = outcomes.verdict_ids()
    assert set(ids) == {s.event_id for s in sent}  # none missing; duplicates allowed


def test_workers_joining_and_leaving_lose_nothing(topics: Topics, tmp_path: Path) -> None:
    env = worker_env(topics, None, STREAMGUARD_DETECTORS__OPTIONS='{"brightness": {"delay_s": 0.03}}')
    first, second = WorkerProcess(env, tmp_path, "w1"), WorkerProcess(env, tmp_path, "w2")
    third = None
    try:
        first.wait_for_event("worker.partitions_assigned")
        second.wait_for_event("worker.partitions_assigned")
        sent = produce(topics, image_events(_distinct_images(80, seed=2), prefix="a"))
        time.sleep(2)
        third = WorkerProcess(env, tmp_path, "w3")
        sent += produce(topics, image_events(_distinct_images(80, seed=3), prefix="b"))
        third.wait_for_event("worker.partitions_assigned")
        first.signal(signal.SIGTERM)
        assert first.wait(60) == 0
        sent += produce(topics, image_events(_distinct_images(40, seed=4), prefix="c"))
        outcomes = wait_for_outcomes(topics, sent, timeout=150)
    finally:
        for worker in (second, third):
            if worker is not None:
                worker.signal(signal.SIGTERM)
                worker.wait(60)
        first.stop()
    assert set(outcomes.verdict_ids()) == {s.event_id for s in sent}
    # Both original workers held partitions at the same time: the group split the work.
    split = [e["partitions"] for e in second.events() if e.get("event") == "worker.partitions_assigned"]
    assert any(0 < len(p) < topics.partitions for p in split)


def test_partitions_kept_through_a_rebalance_redeliver_their_work_in_flight(topics: Topics, tmp_path: Path) -> None:
    """kafka-python 3.0 keeps a partition's fetch position when a rebalance hands it back to the same
    member; the worker drops what it had in flight at the revoke, so it must fetch that work again."""
    # Slow enough that the worker still has records in flight when the second member joins.
    env = worker_env(topics, None, STREAMGUARD_DETECTORS__OPTIONS='{"brightness": {"delay_s": 0.2}}')
    worker = WorkerProcess(env, tmp_path)
    intruder = None
    try:
        worker.wait_for_event("worker.partitions_assigned")
        sent = produce(topics, image_events(_distinct_images(60, seed=7), prefix="k"))
        deadline = time.monotonic() + 60
        while not read_outcomes(topics).verdicts:
            assert time.monotonic() < deadline, worker.log_path.read_text()[-2000:]
            time.sleep(0.1)
        # A second member joins while records are in flight, takes some partitions and leaves: the worker
        # is revoked twice and keeps some of its partitions both times.
        intruder = KafkaConsumer(topics.input, bootstrap_servers=topics.bootstrap, group_id=topics.group,
                                 enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=1000)
        deadline = time.monotonic() + 30
        while not (intruder.assignment() and _holds_some(worker, topics.partitions)):
            assert time.monotonic() < deadline, "the group was not split"
            intruder.poll(timeout_ms=200, max_records=1)
            intruder.pause(*intruder.assignment())  # it takes partitions, never work
        intruder.close(autocommit=False)
        intruder = None
        outcomes = wait_for_outcomes(topics, sent, timeout=90)
    finally:
        if intruder is not None:
            intruder.close(autocommit=False)
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    assert not missing(sent, outcomes)
    rewound = [e["rewound"] for e in worker.events() if e.get("event") == "worker.partitions_assigned"]
    assert any(rewound), "no partition was handed back with work in flight: the test proved nothing"


def _holds_some(worker: WorkerProcess, partitions: int) -> bool:
    """Whether the worker's latest assignment is a part of the topic's partitions."""
    assigned = [e["partitions"] for e in worker.events() if e.get("event") == "worker.partitions_assigned"]
    return bool(assigned) and 0 < len(assigned[-1]) < partitions


def test_redis_outage_keeps_processing_and_dedupe_resumes(topics: Topics, tmp_path: Path) -> None:
    redis = start_redis(tmp_path / "redis")
    worker = WorkerProcess(worker_env(topics, _redis_url(redis), STREAMGUARD_REDIS__RETRY_INTERVAL_S="0.5"),
                           tmp_path)
    try:
        before = produce(topics, image_events(_distinct_images(5, seed=5), prefix="before"))
        wait_for_outcomes(topics, before)
        redis.stop()
        during = produce(topics, image_events(_distinct_images(5, seed=6), prefix="during"))
        wait_for_outcomes(topics, during)
        ready = json.loads(_get(worker.health_port, "/readyz", ok=(200, 503)))
        assert ready["redis"] == "down"
        redis = start_redis(tmp_path / "redis", port=redis.port)
        time.sleep(1.0)
        repeat = produce(topics, image_events(_distinct_images(1, seed=6), prefix="after-a"))
        wait_for_outcomes(topics, repeat)
        again = produce(topics, image_events(_distinct_images(1, seed=6), prefix="after-b"))
        outcomes = wait_for_outcomes(topics, before + during + repeat + again)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        redis.stop()
    by_id = {v["event_id"]: v for v in outcomes.verdicts}
    assert all(by_id[f"during-{i}"]["duplicate_of"] is None for i in range(5))  # scored without dedupe
    assert by_id["after-b-0"]["duplicate_of"] == "after-a-0"  # dedupe is back
    assert any(e.get("event") == "dedupe.redis_down" for e in worker.events())
    assert any(e.get("event") == "dedupe.redis_up" for e in worker.events())


def test_sigterm_drains_commits_and_exits_0(topics: Topics, tmp_path: Path) -> None:
    env = worker_env(topics, None, STREAMGUARD_DETECTORS__OPTIONS='{"brightness": {"delay_s": 0.02}}')
    worker = WorkerProcess(env, tmp_path)
    worker.wait_for_event("worker.partitions_assigned")
    sent = produce(topics, image_events(_distinct_images(40, seed=7)))
    deadline = time.monotonic() + 60
    while not read_outcomes(topics).verdicts:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    health = json.loads(_get(worker.health_port, "/healthz"))
    assert health["alive"] is True
    ready = json.loads(_get(worker.health_port, "/readyz"))
    assert ready["ready"] is True and ready["partitions_assigned"] == topics.partitions
    metrics = _get(worker.health_port, "/metrics")
    assert "streamguard_events_in_total" in metrics and "streamguard_stage_seconds_bucket" in metrics
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    events = [e["event"] for e in worker.events()]
    assert "worker.draining" in events and "worker.stopped" in events
    outcomes = read_outcomes(topics)
    # Whatever the worker had fetched, it finished and committed; nothing committed is unfinished.
    committed = committed_offsets(topics)
    done = {(s.partition, s.offset) for s in sent if s.event_id in set(outcomes.verdict_ids())}
    for partition, offset in committed.items():
        assert all((partition, o) in done for o in range(offset)), (partition, offset)
    stopped = next(e for e in worker.events() if e["event"] == "worker.stopped")
    if stopped["drained"]:
        published = {s.event_id for s in sent} & set(outcomes.verdict_ids())
        finished = {(s.partition, s.offset) for s in sent if s.event_id in published}
        assert sum(committed.values()) == len(finished)
    assert sum(committed.values()) > 0
    assert end_offsets(topics)


def test_a_short_drain_budget_still_commits_everything_acknowledged(topics: Topics, tmp_path: Path) -> None:
    """With the drain budget spent early, work finished after it (and acknowledged during shutdown) is
    still committed: the restarted worker judges nothing twice."""
    # About 140 records are still in flight at SIGTERM: at 0.25 s per detector call of 16 they need ~2 s,
    # far past the budget even when one of the drain's polls stalls (kafka-python 3 has been seen to block
    # 0.5 s), yet within the 5 s the shutdown gives the processing thread.
    env = worker_env(topics, None, STREAMGUARD_DETECTORS__OPTIONS='{"brightness": {"delay_s": 0.25}}',
                     STREAMGUARD_WORKER__DRAIN_TIMEOUT_S="0.05")
    worker = WorkerProcess(env, tmp_path, "short-drain")
    worker.wait_for_event("worker.partitions_assigned")
    sent = produce(topics, image_events(_distinct_images(160, seed=17)))
    deadline = time.monotonic() + 60
    while len(read_outcomes(topics).verdicts) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    stopped = next(e for e in worker.events() if e["event"] == "worker.stopped")
    assert stopped["drained"] is False  # the budget ran out with work in flight: the case under test
    restarted = WorkerProcess(env, tmp_path, "after-drain")
    try:
        restarted.wait_for_event("worker.partitions_assigned")
        outcomes = wait_for_outcomes(topics, sent)
        time.sleep(2)  # time for redelivered duplicates, if any, to be judged
        outcomes = read_outcomes(topics)
    finally:
        restarted.signal(signal.SIGTERM)
        assert restarted.wait(60) == 0
    ids = outcomes.verdict_ids()
    assert len(ids) == len(set(ids)) == len(sent)


def _get(port: int, path: str, ok: tuple[int, ...] = (200,)) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code in ok:
            return exc.read().decode()
        raise


def test_content_leased_by_another_worker_is_not_scored_twice(topics: Topics, redis_service: Service,
                                                               tmp_path: Path) -> None:
    """Another worker holds the in-flight lease: this one defers the record (and keeps processing
    others) until that worker's verdict lands in the cache, then reuses it."""
    from streamguard.config import DedupeSettings, RedisSettings
    from streamguard.dedupe import RedisDedupe, versions_key
    from streamguard.config import load_settings
    from streamguard.policy import policy_version
    from streamguard.schemas import DetectorScore, Verdict

    contested, other = encode(solid(240), "PNG"), encode(solid(20), "PNG")
    sha = __import__("hashlib").sha256(contested).hexdigest()
    # A long lease stands for a live worker elsewhere that keeps renewing its own.
    store = RedisDedupe(DedupeSettings(namespace=topics.prefix, lease_ms=300_000),
                        RedisSettings(url=_redis_url(redis_service)))
    assert store.acquire(sha, "elsewhere")
    worker = WorkerProcess(worker_env(topics, _redis_url(redis_service)), tmp_path)
    try:
        sent = produce(topics, image_events([contested], prefix="contested") + image_events([other], prefix="other"))
        wait_for_outcomes(topics, [s for s in sent if s.event_id == "other-0"])
        assert "contested-0" not in read_outcomes(topics).verdict_ids()  # deferred, not scored
        # The other worker finishes: its verdict is cached under the key this worker computes.
        policy = policy_version(load_settings().policy)  # the policy the worker runs (the tests' pinned one)
        vkey = versions_key({"brightness": "test-1", "provenance": PROVENANCE_VERSION}, policy)
        # Cached answers are decided again from their scores: one score whose logit fuses to 0.97.
        score = DetectorScore(detector="brightness", version="test-1", logit=math.log(0.97 / 0.03),
                              probability=0.97, latency_ms=1.0)
        theirs = Verdict(event_id="scored-elsewhere", content_sha256=sha, label="ai_generated", probability=0.97,
                         scores=[score], policy_version=policy,
                         model_versions={"brightness": "test-1", "provenance": PROVENANCE_VERSION})
        store.put(sha, vkey, theirs, None)
        store.release(sha, "elsewhere")
        outcomes = wait_for_outcomes(topics, sent)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        store.close()
    verdict = next(v for v in outcomes.verdicts if v["event_id"] == "contested-0")
    assert verdict["duplicate_of"] == "scored-elsewhere" and verdict["probability"] == pytest.approx(0.97)


def test_copies_inside_one_batch_are_scored_once(topics: Topics, tmp_path: Path) -> None:
    image = encode(noise((40, 40), seed=99), "PNG")
    worker = WorkerProcess(worker_env(topics, None, STREAMGUARD_WORKER__BATCH_WAIT_MS="500"), tmp_path)
    try:
        worker.wait_for_event("worker.partitions_assigned")
        # Sent together, so both copies are polled together and land in one batch.
        sent = produce(topics, image_events([image, image], prefix="copy"))
        outcomes = wait_for_outcomes(topics, sent)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    by_id = {v["event_id"]: v for v in outcomes.verdicts}
    # Whichever copy the batch met first was scored; the other reuses it (dedupe is off: no Redis).
    assert sorted([by_id["copy-0"]["duplicate_of"] or "", by_id["copy-1"]["duplicate_of"] or ""]) in (
        ["", "copy-0"], ["", "copy-1"])


def test_flow_control_pauses_and_resumes_without_stalling(topics: Topics, tmp_path: Path) -> None:
    """A backlog far above the in-flight bounds: partitions are paused and resumed many times, and every
    record still comes out (kafka-python 3.0.12 strands records fetched for a paused partition unless
    the worker works around it)."""
    env = worker_env(topics, None, STREAMGUARD_WORKER__MAX_IN_FLIGHT_PER_PARTITION="4",
                     STREAMGUARD_WORKER__MAX_IN_FLIGHT="10")
    sent = produce(topics, image_events(_distinct_images(300, seed=8)))
    worker = WorkerProcess(env, tmp_path)
    try:
        outcomes = wait_for_outcomes(topics, sent, timeout=120)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    assert set(outcomes.verdict_ids()) == {s.event_id for s in sent}


@pytest.mark.parametrize("action", ["reuse", "annotate"])
def test_near_duplicates_reuse_or_annotate(action: str, topics: Topics, redis_service: Service,
                                          tmp_path: Path) -> None:
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    # Overlapping rectangles: structure PDQ rates at full quality (flat or pure-noise images are not).
    rng = np.random.default_rng(7)
    original = Image.new("RGB", (512, 512), (90, 120, 160))
    draw = ImageDraw.Draw(original)
    for _ in range(40):
        x0, y0 = (int(v) for v in rng.integers(0, 480, 2))
        w, h = (int(v) for v in rng.integers(20, 160, 2))
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    smaller = io.BytesIO()
    original.resize((384, 384), Image.Resampling.BILINEAR).save(smaller, format="JPEG", quality=70)
    env = worker_env(topics, _redis_url(redis_service), STREAMGUARD_DEDUPE__NEAR_ACTION=action)
    worker = WorkerProcess(env, tmp_path)
    try:
        first = produce(topics, image_events([encode(original, "PNG")], prefix="orig"))
        wait_for_outcomes(topics, first)
        second = produce(topics, image_events([smaller.getvalue()], prefix="copy"))
        outcomes = wait_for_outcomes(topics, first + second)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    by_id = {v["event_id"]: v for v in outcomes.verdicts}
    copy = by_id["copy-0"]
    assert copy["near_duplicate_of"]["event_id"] == "orig-0"
    assert copy["near_duplicate_of"]["distance"] <= 31
    assert copy["content_sha256"] != by_id["orig-0"]["content_sha256"]
    if action == "reuse":
        assert copy["duplicate_of"] == "orig-0" and copy["scores"] == by_id["orig-0"]["scores"]
    else:
        assert copy["duplicate_of"] is None and "detect" in copy["timings_ms"]  # scored on its own
