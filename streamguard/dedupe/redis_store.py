"""The dedupe store on Redis: exact verdicts, in-flight leases, and a PDQ near-duplicate index.

Keys, all under ``DedupeSettings.namespace`` so deployments can share a Redis:

- ``{ns}:v:{versions}:{sha}``: the verdict JSON, expiring after ``ttl_s``.
- ``{ns}:lease:{sha}``: the owner scoring the content now (``SET NX PX lease_ms``); dropped by a
  compare-and-delete script, so a worker whose lease expired and was taken over never frees another's.
- ``{ns}:near:{versions}:{band}:{value}``: the near-duplicate index (see `band_probes`), a sorted set of
  ``"{sha}:{pdq hex}"`` members scored by their expiry time.

Why the index looks like this: a member carries its full PDQ hash, so one round trip returns candidates
ready to verify, with no second fetch. Members carry their own expiry because a band value shared by much
content is written again and again: a key TTL alone would keep it, and every member ever added, forever;
writes trim expired members and reads skip them. The key TTL still reclaims a band nobody writes.

Fail-soft: a connection error or timeout marks the store down, logs ``dedupe.redis_down`` once, and every
call then returns its "no dedupe" answer at once. At most every ``retry_interval_s`` one call PINGs Redis;
when that answers, ``dedupe.redis_up`` is logged and the store is back. redis-py's own retries are off (its
default is ten, with backoff): a dead Redis must cost one socket timeout per retry interval, not per record.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from itertools import combinations
from typing import TypeVar

import structlog
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamguard.config import DedupeSettings, RedisSettings
from streamguard.dedupe.phash import HASH_BITS, PerceptualHash, bit_distance
from streamguard.dedupe.store import CachedVerdict, DedupeStats, NearMatch
from streamguard.schemas import Verdict
from streamguard.redis_client import connect

log = structlog.get_logger(__name__)

T = TypeVar("T")

BANDS = 16
BAND_BITS = HASH_BITS // BANDS
_BAND_BYTES = BAND_BITS // 8

# Verified matches are fetched closest first, a few at a time: the closest usually has a verdict.
_VERDICT_BATCH = 32

# KEYS[1] lease, ARGV[1] owner. GET then DEL from the client could delete a lease another owner took
# between the two; inside one script Redis runs them atomically.
_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


# KEYS lease keys, ARGV[1] owner, ARGV[2] lease ms: extend only the leases this owner still holds.
_RENEW_LUA = """
for _, key in ipairs(KEYS) do
    if redis.call('get', key) == ARGV[1] then
        redis.call('pexpire', key, ARGV[2])
    end
end
return 0
"""


@lru_cache(maxsize=8)
def _band_masks(radius: int) -> tuple[int, ...]:
    """Every BAND_BITS-bit mask with at most ``radius`` bits set, 0 first."""
    return tuple(
        sum(1 << bit for bit in bits)
        for k in range(radius + 1)
        for bits in combinations(range(BAND_BITS), k)
    )


def band_values(phash: PerceptualHash) -> list[int]:
    return [int.from_bytes(phash.bits[i * _BAND_BYTES:(i + 1) * _BAND_BYTES], "big") for i in range(BANDS)]


def band_probes(phash: PerceptualHash, max_distance: int) -> Iterator[tuple[int, int]]:
    """The (band, value) cells to read to find every indexed hash within ``max_distance`` bits.

    Multi-index hashing: each of the 16 bands of 16 bits is indexed by its exact value. Two hashes at
    distance d share their 256 differing bits out among 16 bands, so by pigeonhole the band with the
    fewest differences has at most floor(d / 16) of them. Probing, in every band, each value within
    r = floor(max_distance / 16) bits of ours therefore reaches every hash within max_distance: recall is
    exact, never probabilistic. For PDQ's 31, r = 1: the exact value and its 16 one-bit neighbours, 16 x 17
    = 272 cells. Candidates then need a full distance check, because a shared band says nothing of the rest.
    """
    masks = _band_masks(max_distance // BANDS)
    for band, value in enumerate(band_values(phash)):
        for mask in masks:
            yield band, value ^ mask


class RedisDedupe:
    """`DedupeStore` on Redis. Safe to share between threads; ``stats`` counters are best-effort."""

    def __init__(
        self,
        settings: DedupeSettings,
        redis: RedisSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = DedupeStats()
        self._settings = settings
        self._retry_interval_s = redis.retry_interval_s
        self._clock = clock
        self._client: Redis = connect(redis, decode_responses=True)
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._renew_script = self._client.register_script(_RENEW_LUA)
        self._lock = threading.Lock()
        self._up = True
        self._down_since = 0.0
        self._next_try = 0.0
        self._next_error_log = 0.0
        self._suppressed_errors = 0

    # -- the DedupeStore interface ---------------------------------------------------------------

    @property
    def available(self) -> bool:
        """The last known state; while down and a retry is due, this PINGs Redis to find out."""
        return self._ready()

    def get(self, sha256: str, versions_key: str) -> CachedVerdict | None:
        return self._call("get", lambda: self._get(sha256, versions_key), None)

    def acquire(self, sha256: str, owner: str) -> bool:
        return self._call("acquire", lambda: self._acquire(sha256, owner), True)

    def release(self, sha256: str, owner: str) -> None:
        self._call("release", lambda: self._release(sha256, owner), None)

    def renew(self, sha256s: list[str], owner: str) -> None:
        if sha256s:
            self._call("renew", lambda: self._renew(sha256s, owner), None)

    def put(self, sha256: str, versions_key: str, verdict: Verdict, phash: PerceptualHash | None) -> None:
        self._call("put", lambda: self._put(sha256, versions_key, verdict, phash), None)

    def find_near(self, phash: PerceptualHash, versions_key: str) -> NearMatch | None:
        if not self._indexable(phash):
            return None
        return self._call("find_near", lambda: self._find_near(phash, versions_key), None)

    def close(self) -> None:
        self._client.close()

    # -- Redis operations --------------------------------------------------------------------------

    def _get(self, sha256: str, versions_key: str) -> CachedVerdict | None:
        raw = self._client.get(self._verdict_key(versions_key, sha256))
        cached = None if raw is None else _decode(raw, sha256)
        if cached is None:
            self.stats.misses += 1
        else:
            self.stats.exact_hits += 1
        return cached

    def _acquire(self, sha256: str, owner: str) -> bool:
        return bool(self._client.set(self._lease_key(sha256), owner, nx=True, px=self._settings.lease_ms))

    def _release(self, sha256: str, owner: str) -> None:
        self._release_script(keys=[self._lease_key(sha256)], args=[owner])

    def _renew(self, sha256s: list[str], owner: str) -> None:
        keys = [self._lease_key(sha) for sha in sha256s]
        self._renew_script(keys=keys, args=[owner, self._settings.lease_ms])

    def _put(self, sha256: str, versions_key: str, verdict: Verdict, phash: PerceptualHash | None) -> None:
        ttl_s = self._settings.ttl_s
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._verdict_key(versions_key, sha256), verdict.model_dump_json(), ex=ttl_s)
        if phash is not None and self._indexable(phash):
            # Wall-clock scores: all workers read and trim the same sets; their monotonic clocks differ.
            now = time.time()
            member = f"{sha256}:{phash.bits.hex()}"
            for band, value in enumerate(band_values(phash)):
                key = self._band_key(versions_key, band, value)
                pipe.zadd(key, {member: now + ttl_s})
                pipe.zremrangebyscore(key, "-inf", now)
                pipe.expire(key, ttl_s)
        pipe.execute()

    def _find_near(self, phash: PerceptualHash, versions_key: str) -> NearMatch | None:
        max_distance = self._settings.near_max_distance
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        for band, value in band_probes(phash, max_distance):
            pipe.zrangebyscore(self._band_key(versions_key, band, value), now, "+inf")
        members: set[str] = set().union(*pipe.execute())

        matches: list[tuple[int, str]] = []
        for member in members:
            sha256, _, hex_bits = member.partition(":")
            try:
                distance = bit_distance(phash.bits, bytes.fromhex(hex_bits))
            except ValueError:
                continue
            if distance <= max_distance:
                matches.append((distance, sha256))
        matches.sort()

        for start in range(0, len(matches), _VERDICT_BATCH):
            batch = matches[start:start + _VERDICT_BATCH]
            raws = self._client.mget([self._verdict_key(versions_key, sha) for _, sha in batch])
            for (distance, sha256), raw in zip(batch, raws, strict=True):
                # No verdict: it expired before its index entry was trimmed.
                cached = None if raw is None else _decode(raw, sha256)
                if cached is not None:
                    self.stats.near_hits += 1
                    return NearMatch(sha256=sha256, distance=distance, cached=cached)
        self.stats.near_misses += 1
        return None

    # -- keys --------------------------------------------------------------------------------------

    def _verdict_key(self, versions_key: str, sha256: str) -> str:
        return f"{self._settings.namespace}:v:{versions_key}:{sha256}"

    def _lease_key(self, sha256: str) -> str:
        return f"{self._settings.namespace}:lease:{sha256}"

    def _band_key(self, versions_key: str, band: int, value: int) -> str:
        return f"{self._settings.namespace}:near:{versions_key}:{band:x}:{value:04x}"

    def _indexable(self, phash: PerceptualHash) -> bool:
        return self._settings.near and phash.quality >= self._settings.near_min_quality

    # -- failing soft ------------------------------------------------------------------------------

    def _call(self, op: str, fn: Callable[[], T], fallback: T) -> T:
        if not self._ready():
            self.stats.degraded_calls += 1
            return fallback
        try:
            return fn()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._mark_down(op, exc)
        except RedisError as exc:
            # Redis answered, with an error (out of memory, read-only replica, ...): this call gets no
            # dedupe, the next one tries again.
            self.stats.errors += 1
            self._log_error(op, exc)
        self.stats.degraded_calls += 1
        return fallback

    def _ready(self) -> bool:
        with self._lock:
            if self._up:
                return True
            now = self._clock()
            if now < self._next_try:
                return False
            # Claimed under the lock, so concurrent callers do not all PING a dead server.
            self._next_try = now + self._retry_interval_s
        try:
            self._client.ping()
        except RedisError:
            self.stats.errors += 1
            return False
        with self._lock:
            if self._up:
                return True
            self._up = True
            down_s = self._clock() - self._down_since
        log.info("dedupe.redis_up", down_s=round(down_s, 3))
        return True

    def _mark_down(self, op: str, exc: RedisError) -> None:
        self.stats.errors += 1
        with self._lock:
            was_up = self._up
            self._up = False
            now = self._clock()
            self._next_try = now + self._retry_interval_s
            if was_up:
                self._down_since = now
        if was_up:
            log.warning("dedupe.redis_down", op=op, error=repr(exc), retry_interval_s=self._retry_interval_s)
            # Pooled connections to a dead server are dead too; the retry PING must open a fresh one.
            self._client.connection_pool.disconnect()

    def _log_error(self, op: str, exc: RedisError) -> None:
        # An error Redis repeats for every record (a full memory) would otherwise log once per record.
        now = self._clock()
        with self._lock:
            if now < self._next_error_log:
                self._suppressed_errors += 1
                return
            self._next_error_log = now + self._retry_interval_s
            suppressed, self._suppressed_errors = self._suppressed_errors, 0
        log.warning("dedupe.redis_error", op=op, error=repr(exc), suppressed=suppressed)


def _decode(raw: str, sha256: str) -> CachedVerdict | None:
    # Only the event id and tenant are read here; the caller parses the verdict itself, with its own schema
    # check.
    try:
        record = json.loads(raw)
        event_id, tenant = record["event_id"], record.get("tenant")
    except (ValueError, KeyError, TypeError, AttributeError):
        event_id = tenant = None
    if not isinstance(event_id, str):
        log.warning("dedupe.bad_record", sha256=sha256)
        return None
    return CachedVerdict(event_id=event_id, verdict_json=raw, sha256=sha256,
                         tenant=tenant if isinstance(tenant, str) else None)
