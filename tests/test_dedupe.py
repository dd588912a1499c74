"""The Redis dedupe store against a real redis-server: exact reuse, leases, the near-duplicate index, and
failing soft when Redis goes away and comes back."""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from redis import Redis
from structlog.testing import capture_logs

from streamguard.config import DedupeSettings, RedisSettings
from streamguard.dedupe import (
    DedupeStore,
    NullDedupe,
    PerceptualHash,
    RedisDedupe,
    hamming,
    open_store,
    perceptual_hash,
    versions_key,
)
from streamguard.dedupe.redis_store import BANDS, band_probes
from streamguard.devstack import Service, free_port, start_redis
from streamguard.schemas import Verdict

VERSIONS = versions_key({"clip-probe": "1.0", "exif": "2"}, "policy-1")


# -- fixtures and helpers --------------------------------------------------------------------------


# `redis_service` is the session's server from conftest.py; each test writes under its own namespace.


@pytest.fixture(scope="module")
def raw(redis_service: Service) -> Iterator[Redis]:
    """A plain client, to look at what the store wrote."""
    client = Redis(port=redis_service.port, decode_responses=True)
    yield client
    client.close()


def new_namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def open_redis_store(service: Service, namespace: str | None = None, **dedupe: object) -> RedisDedupe:
    return RedisDedupe(
        DedupeSettings(namespace=namespace or new_namespace(), **dedupe),  # type: ignore[arg-type]
        RedisSettings(url=f"redis://127.0.0.1:{service.port}/0"),
    )


@pytest.fixture
def store(redis_service: Service) -> Iterator[RedisDedupe]:
    store = open_redis_store(redis_service)
    yield store
    store.close()


@pytest.fixture(scope="module")
def shared_store(redis_service: Service) -> Iterator[RedisDedupe]:
    """For hypothesis tests, which run many examples per test: each example uses its own versions key."""
    store = open_redis_store(redis_service)
    yield store
    store.close()


def new_sha() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def make_verdict(sha: str, event_id: str = "evt-1") -> Verdict:
    return Verdict(
        event_id=event_id, content_sha256=sha, label="ai_generated", probability=0.93, scores=[],
        policy_version="policy-1", model_versions={"clip-probe": "1.0", "exif": "2"},
    )


def scene(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A photo-like test image: smooth colour gradients, a few solid shapes, light noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [
        127 + 100 * np.sin(x / w * np.pi * rng.uniform(1, 3) + phase[c])
        * np.cos(y / h * np.pi * rng.uniform(1, 3))
        for c in range(3)
    ]
    img = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0, side = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40)), int(rng.integers(20, 90))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + side, y0 + side], fill=colour)
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def recompressed(img: Image.Image) -> Image.Image:
    """Half the size, JPEG quality 70: what a repost through a social network does to an image."""
    buf = io.BytesIO()
    img.resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=70)
    return Image.open(io.BytesIO(buf.getvalue()))


def flip(phash: PerceptualHash, positions: set[int] | list[int]) -> PerceptualHash:
    value = int.from_bytes(phash.bits, "big")
    for pos in positions:
        value ^= 1 << pos
    return PerceptualHash(bits=value.to_bytes(32, "big"), quality=phash.quality)


def namespace_keys(raw: Redis, store: RedisDedupe) -> list[str]:
    return sorted(raw.scan_iter(match=f"{store._settings.namespace}:*", count=1000))


# -- the interface ---------------------------------------------------------------------------------


def test_versions_key_is_stable_and_changes_with_any_version() -> None:
    key = versions_key({"a": "1", "b": "2"}, "p1")
    assert key == versions_key({"b": "2", "a": "1"}, "p1")
    assert len(key) == 16 and int(key, 16) >= 0
    assert key != versions_key({"a": "1", "b": "3"}, "p1")
    assert key != versions_key({"a": "1", "b": "2"}, "p2")
    assert key != versions_key({"a": "1"}, "p1")


def test_null_store_is_a_store_that_never_dedupes() -> None:
    null = NullDedupe()
    assert isinstance(null, DedupeStore)
    sha = new_sha()
    null.put(sha, VERSIONS, make_verdict(sha), None)
    assert null.get(sha, VERSIONS) is None
    assert null.acquire(sha, "a") and null.acquire(sha, "b")
    assert null.find_near(PerceptualHash(bits=bytes(32), quality=100), VERSIONS) is None
    assert null.available
    null.release(sha, "a")
    null.close()


def test_open_store_follows_enabled(redis_service: Service) -> None:
    redis = RedisSettings(url=f"redis://127.0.0.1:{redis_service.port}/0")
    assert isinstance(open_store(DedupeSettings(enabled=False), redis), NullDedupe)
    opened = open_store(DedupeSettings(namespace=new_namespace()), redis)
    assert isinstance(opened, RedisDedupe) and isinstance(opened, DedupeStore)
    opened.close()


# -- exact dedupe and leases -----------------------------------------------------------------------


def test_put_then_get_round_trips_the_verdict(store: RedisDedupe) -> None:
    sha = new_sha()
    assert store.get(sha, VERSIONS) is None
    verdict = make_verdict(sha, event_id="first-event")
    store.put(sha, VERSIONS, verdict, None)

    cached = store.get(sha, VERSIONS)
    assert cached is not None
    assert cached.event_id == "first-event" and cached.sha256 == sha
    assert Verdict.model_validate_json(cached.verdict_json) == verdict
    assert (store.stats.misses, store.stats.exact_hits, store.stats.errors) == (1, 1, 0)


def test_other_versions_miss(store: RedisDedupe) -> None:
    sha = new_sha()
    store.put(sha, VERSIONS, make_verdict(sha), None)
    upgraded = versions_key({"clip-probe": "1.1", "exif": "2"}, "policy-1")
    assert store.get(sha, upgraded) is None
    assert store.get(new_sha(), VERSIONS) is None


def test_every_key_written_expires(redis_service: Service, raw: Redis) -> None:
    store = open_redis_store(redis_service, ttl_s=3600, lease_ms=5000)
    sha = new_sha()
    phash = perceptual_hash(scene(1))
    assert store.acquire(sha, "owner")
    store.put(sha, VERSIONS, make_verdict(sha), phash)

    keys = namespace_keys(raw, store)
    assert len(keys) == 1 + BANDS + 1  # verdict, one index cell per band, lease
    for key in keys:
        ttl_ms = raw.pttl(key)
        limit_ms = 5000 if ":lease:" in key else 3600 * 1000
        assert 0 < ttl_ms <= limit_ms, key
    store.close()


def test_lease_is_exclusive_and_only_its_owner_frees_it(redis_service: Service, raw: Redis) -> None:
    namespace = new_namespace()
    first = open_redis_store(redis_service, namespace)
    second = open_redis_store(redis_service, namespace)
    sha = new_sha()

    assert first.acquire(sha, "worker-a")
    assert not second.acquire(sha, "worker-b")
    assert not first.acquire(sha, "worker-a")  # not re-entrant: a lease is one scoring

    second.release(sha, "worker-b")
    assert raw.get(f"{namespace}:lease:{sha}") == "worker-a"
    assert not second.acquire(sha, "worker-b")

    first.release(sha, "worker-a")
    assert raw.get(f"{namespace}:lease:{sha}") is None
    assert second.acquire(sha, "worker-b")
    first.close()
    second.close()


def test_lease_expires_on_its_own(redis_service: Service) -> None:
    store = open_redis_store(redis_service, lease_ms=100)
    sha = new_sha()
    assert store.acquire(sha, "crashed-worker")
    time.sleep(0.25)
    assert store.acquire(sha, "next-worker")
    store.close()


# -- near duplicates -------------------------------------------------------------------------------


def test_recompressed_copy_is_a_near_duplicate_and_other_images_are_not(store: RedisDedupe) -> None:
    original = scene(7)
    sha = new_sha()
    store.put(sha, VERSIONS, make_verdict(sha, "original-event"), perceptual_hash(original))

    copy_hash = perceptual_hash(recompressed(original))
    match = store.find_near(copy_hash, VERSIONS)
    assert match is not None
    assert match.sha256 == sha and match.cached.event_id == "original-event"
    assert match.distance == hamming(copy_hash, perceptual_hash(original)) <= 31

    assert store.find_near(perceptual_hash(scene(8)), VERSIONS) is None
    assert store.find_near(copy_hash, versions_key({"clip-probe": "2"}, "policy-1")) is None
    assert (store.stats.near_hits, store.stats.near_misses) == (1, 2)


def test_closest_match_with_a_verdict_wins(store: RedisDedupe, raw: Redis) -> None:
    query = perceptual_hash(scene(11))
    near, nearer, nearest = new_sha(), new_sha(), new_sha()
    store.put(near, VERSIONS, make_verdict(near, "near"), flip(query, range(0, 200, 10)))  # 20 bits
    store.put(nearer, VERSIONS, make_verdict(nearer, "nearer"), flip(query, range(0, 200, 40)))  # 5 bits
    store.put(nearest, VERSIONS, make_verdict(nearest, "nearest"), flip(query, [3]))

    match = store.find_near(query, VERSIONS)
    assert match is not None and (match.cached.event_id, match.distance) == ("nearest", 1)

    # A verdict that expired before its index entry: skipped, the next closest answers.
    raw.delete(f"{store._settings.namespace}:v:{VERSIONS}:{nearest}")
    match = store.find_near(query, VERSIONS)
    assert match is not None and (match.cached.event_id, match.distance) == ("nearer", 5)


def test_low_quality_hashes_are_neither_indexed_nor_searched(store: RedisDedupe, raw: Redis) -> None:
    flat = perceptual_hash(Image.new("RGB", (200, 200), (90, 120, 30)))
    assert flat.quality < 50
    sha = new_sha()
    store.put(sha, VERSIONS, make_verdict(sha), flat)
    assert namespace_keys(raw, store) == [f"{store._settings.namespace}:v:{VERSIONS}:{sha}"]
    assert store.find_near(flat, VERSIONS) is None
    assert store.find_near(PerceptualHash(bits=flat.bits, quality=100), VERSIONS) is None


def test_near_search_can_be_switched_off(redis_service: Service, raw: Redis) -> None:
    store = open_redis_store(redis_service, near=False)
    sha = new_sha()
    phash = perceptual_hash(scene(3))
    store.put(sha, VERSIONS, make_verdict(sha), phash)
    assert len(namespace_keys(raw, store)) == 1
    assert store.find_near(phash, VERSIONS) is None
    store.close()


def test_probe_covers_exact_values_and_one_bit_neighbours() -> None:
    phash = PerceptualHash(bits=bytes(range(32)), quality=100)
    probes = list(band_probes(phash, 31))
    assert len(probes) == len(set(probes)) == 16 * 17
    assert len(list(band_probes(phash, 15))) == 16  # below 16 bits, exact band values suffice
    assert len(list(band_probes(phash, 32))) == 16 * (1 + 16 + 120)


hashes = st.builds(PerceptualHash, bits=st.binary(min_size=32, max_size=32), quality=st.just(100))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(phash=hashes, flips=st.sets(st.integers(0, 255), max_size=31))
def test_any_hash_within_31_bits_is_found(
    shared_store: RedisDedupe, phash: PerceptualHash, flips: set[int]
) -> None:
    versions = uuid.uuid4().hex[:16]
    sha = new_sha()
    shared_store.put(sha, versions, make_verdict(sha), phash)
    match = shared_store.find_near(flip(phash, flips), versions)
    assert match is not None and match.sha256 == sha and match.distance == len(flips)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(phash=hashes, flips=st.sets(st.integers(0, 255), min_size=60, max_size=60))
def test_hashes_far_beyond_the_threshold_do_not_match(
    shared_store: RedisDedupe, phash: PerceptualHash, flips: set[int]
) -> None:
    versions = uuid.uuid4().hex[:16]
    sha = new_sha()
    shared_store.put(sha, versions, make_verdict(sha), phash)
    assert shared_store.find_near(flip(phash, flips), versions) is None


def test_worst_case_spread_at_the_threshold_is_found(store: RedisDedupe) -> None:
    """31 differing bits spread so that no band is exact: 2 bits in 15 bands, 1 in the last. Only the
    one-bit neighbour probe of that last band can find it."""
    phash = PerceptualHash(bits=bytes(range(100, 132)), quality=100)
    spread = [band * 16 + bit for band in range(15) for bit in (2, 9)] + [15 * 16 + 5]
    sha = new_sha()
    store.put(sha, VERSIONS, make_verdict(sha), phash)
    match = store.find_near(flip(phash, spread), VERSIONS)
    assert match is not None and match.distance == 31
    assert store.find_near(flip(phash, [*spread, 15 * 16 + 12]), VERSIONS) is None  # 32 bits


# -- failing soft --------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def assert_no_dedupe_answers(store: RedisDedupe, sha: str, phash: PerceptualHash) -> None:
    assert store.get(sha, VERSIONS) is None
    assert store.acquire(sha, "owner") is True
    store.release(sha, "owner")
    store.put(sha, VERSIONS, make_verdict(sha), phash)
    assert store.find_near(phash, VERSIONS) is None


def test_redis_going_away_and_coming_back(tmp_path: Path) -> None:
    service = start_redis(tmp_path)
    clock = FakeClock()
    store = RedisDedupe(
        DedupeSettings(namespace=new_namespace()),
        RedisSettings(url=f"redis://127.0.0.1:{service.port}/0", socket_timeout_s=0.5, retry_interval_s=5.0),
        clock=clock,
    )
    sha, phash = new_sha(), perceptual_hash(scene(5))
    try:
        store.put(sha, VERSIONS, make_verdict(sha), phash)
        assert store.get(sha, VERSIONS) is not None and store.available

        service.stop()
        with capture_logs() as logs:
            started = time.monotonic()
            for _ in range(20):
                assert_no_dedupe_answers(store, sha, phash)
            assert not store.available
            elapsed = time.monotonic() - started
        assert elapsed < 1.0
        assert [e["event"] for e in logs] == ["dedupe.redis_down"]
        assert store.stats.errors == 1 and store.stats.degraded_calls == 100

        service = start_redis(tmp_path, port=service.port)
        # Back, but the retry interval has not passed: still no traffic to Redis.
        assert not store.available and store.get(sha, VERSIONS) is None

        clock.now += 5.0
        with capture_logs() as logs:
            assert store.available
        assert [e["event"] for e in logs] == ["dedupe.redis_up"]

        # A restarted server without persistence is empty; the store works again.
        assert store.get(sha, VERSIONS) is None
        store.put(sha, VERSIONS, make_verdict(sha, "after-restart"), phash)
        cached = store.get(sha, VERSIONS)
        assert cached is not None and cached.event_id == "after-restart"
        match = store.find_near(phash, VERSIONS)
        assert match is not None and match.distance == 0
        assert store.acquire(sha, "owner") and not store.acquire(sha, "other")
    finally:
        store.close()
        service.stop()


def test_unreachable_redis_from_the_start_fails_open() -> None:
    store = RedisDedupe(
        DedupeSettings(namespace=new_namespace()),
        RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5, retry_interval_s=60),
    )
    phash = perceptual_hash(scene(2))
    started = time.monotonic()
    for _ in range(10):
        assert_no_dedupe_answers(store, new_sha(), phash)
    assert time.monotonic() - started < 2.0
    assert not store.available and store.stats.errors == 1
    store.close()


def test_redis_error_replies_fail_the_call_not_the_store(store: RedisDedupe, raw: Redis) -> None:
    """A key of the wrong type makes Redis answer WRONGTYPE: that call gets no dedupe, the store stays up."""
    sha = new_sha()
    raw.rpush(f"{store._settings.namespace}:v:{VERSIONS}:{sha}", "not-a-string")
    with capture_logs() as logs:
        assert store.get(sha, VERSIONS) is None
        assert store.get(sha, VERSIONS) is None
    assert store.available and store.stats.errors == 2
    assert [e["event"] for e in logs] == ["dedupe.redis_error"]  # the repeat is counted, not logged
