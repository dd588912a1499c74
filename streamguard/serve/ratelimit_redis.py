"""Per-key rate limits in Redis, so every `serve` replica spends one budget per key.

The bucket is kept as GCRA: one number per key, its theoretical arrival time (TAT), which answers exactly
as `RateLimiter`'s token bucket does (tokens = burst - (TAT - now) * rate) for one key and one round trip.
The update runs in a Lua script, atomic in Redis, on Redis's own clock (``TIME``): replicas whose clocks
disagree still agree on every bucket. A key expires when its bucket would be full again, which is also
when it stops carrying anything, so idle keys cost no memory and none outlives ``burst / rate`` seconds.
Key names are ``{dedupe.namespace}:rl:{sha256 of the bucket name}``: API key names and client addresses
never appear in Redis, and several deployments can share one.

Fail-soft: a connection error or timeout marks Redis down and logs ``serve.ratelimit_redis_down`` once;
until ``redis.retry_interval_s`` has passed, requests are limited by a local bucket without trying Redis,
then one request tries it again (``serve.ratelimit_redis_up`` when it answers). An error Redis answers with
(out of memory, a read-only replica) limits that request locally and is logged at most once per retry
interval. Either way the request is counted in ``streamguard_http_ratelimit_fallbacks_total{reason}``:
during an outage each replica allows a key its full rate, a bounded N times it across N replicas, rather
than refusing everything or allowing everything.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import structlog
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamguard.config import RedisSettings, Settings
from streamguard.serve.ratelimit import Limiter, RateLimiter
from streamguard.redis_client import connect

log = structlog.get_logger(__name__)

# KEYS[1] the bucket, ARGV[1] microseconds per token (1e6 / rate), ARGV[2] burst. Returns 0 when a token was
# taken, else the microseconds until one is. Microseconds since the epoch (~1.8e15) are exact in Lua's
# doubles; '%.0f' because tostring() would write them in 14-digit scientific notation.
_GCRA_LUA = """
redis.replicate_commands()
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now) or now
if tat < now then tat = now end
local wait = tat - now - (burst - 1) * interval
if wait > 0 then return math.ceil(wait) end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
return 0
"""


def _ignore(reason: str) -> None:
    pass


class RedisRateLimiter:
    """`Limiter` on Redis. Safe to share between threads."""

    def __init__(self, redis: RedisSettings, namespace: str, on_fallback: Callable[[str], None] = _ignore,
                 local: RateLimiter | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._client: Redis = connect(redis)
        self._script = self._client.register_script(_GCRA_LUA)
        self._prefix = f"{namespace}:rl:"
        self._local = local or RateLimiter(clock)
        self._on_fallback = on_fallback
        self._retry_interval_s = redis.retry_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._up = True
        self._down_since = 0.0
        self._next_try = 0.0
        self._next_error_log = 0.0
        self._suppressed_errors = 0

    def take(self, key: str, rate: float, burst: int) -> float:
        if not self._due():
            return self._fall_back("unreachable", key, rate, burst)
        try:
            wait_us = self._script(keys=[self.redis_key(key)], args=[repr(1_000_000 / rate), burst])
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._mark_down(exc)
            return self._fall_back("unreachable", key, rate, burst)
        except RedisError as exc:
            self._log_error(exc)
            return self._fall_back("error", key, rate, burst)
        self._mark_up()
        return int(wait_us) / 1_000_000

    def redis_key(self, key: str) -> str:
        return self._prefix + hashlib.sha256(key.encode()).hexdigest()[:32]

    def close(self) -> None:
        self._client.close()

    def _fall_back(self, reason: str, key: str, rate: float, burst: int) -> float:
        self._on_fallback(reason)
        return self._local.take(key, rate, burst)

    def _due(self) -> bool:
        with self._lock:
            if self._up:
                return True
            now = self._clock()
            if now < self._next_try:
                return False
            # Claimed under the lock: while Redis is down, one request per interval pays for finding out.
            self._next_try = now + self._retry_interval_s
            return True

    def _mark_up(self) -> None:
        if self._up:  # unlocked read: the common case must not take the lock
            return
        with self._lock:
            if self._up:
                return
            self._up = True
            down_s = self._clock() - self._down_since
        log.info("serve.ratelimit_redis_up", down_s=round(down_s, 3))

    def _mark_down(self, exc: RedisError) -> None:
        with self._lock:
            was_up, self._up = self._up, False
            now = self._clock()
            self._next_try = now + self._retry_interval_s
            if was_up:
                self._down_since = now
        if was_up:
            log.warning("serve.ratelimit_redis_down", error=repr(exc), retry_interval_s=self._retry_interval_s,
                        fallback="local buckets")
            # Pooled connections to a dead server are dead too; the retry must open a fresh one.
            self._client.connection_pool.disconnect()

    def _log_error(self, exc: RedisError) -> None:
        # An error Redis repeats for every request (a full memory) would otherwise log once per request.
        now = self._clock()
        with self._lock:
            if now < self._next_error_log:
                self._suppressed_errors += 1
                return
            self._next_error_log = now + self._retry_interval_s
            suppressed, self._suppressed_errors = self._suppressed_errors, 0
        log.warning("serve.ratelimit_redis_error", error=repr(exc), suppressed=suppressed, fallback="local buckets")


def open_limiter(settings: Settings, on_fallback: Callable[[str], None] = _ignore) -> Limiter:
    """The limiter ``serve.rate_limit_store`` asks for; "auto" is Redis when dedupe is on, because serve then
    depends on that Redis already. Opening does no I/O: an unreachable Redis shows on the first request."""
    store = settings.serve.rate_limit_store
    if store == "auto":
        store = "redis" if settings.dedupe.enabled else "local"
    if store == "local":
        return RateLimiter()
    return RedisRateLimiter(settings.redis, settings.dedupe.namespace, on_fallback)
