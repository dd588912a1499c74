"""Per-key rate limits: a key may spend ``burst`` requests at once, then ``rate`` a second.

A refusal says how long until the next token, which becomes the 429's Retry-After. Two `Limiter`s give the
same answers: `RateLimiter` keeps the buckets in this process, and `RedisRateLimiter`
(`streamguard.serve.ratelimit_redis`) keeps them in Redis, so every replica behind a load balancer spends
one budget per key. Which one serves is ``serve.rate_limit_store``; the Redis one falls back to a
`RateLimiter` of its own while Redis cannot answer, so an outage costs the limit's precision (each replica
then allows a key its full rate), never the limit itself.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# Past this many buckets the full ones are dropped (a full bucket is what a new one would be): with
# auth off, buckets are per client address, and addresses are not a bounded set.
_MAX_BUCKETS = 10_000


class Limiter(Protocol):
    def take(self, key: str, rate: float, burst: int) -> float:
        """Spend one token of ``key``'s bucket: 0.0 if there was one, else the seconds until there is."""
        ...

    def close(self) -> None: ...


@dataclass
class _Bucket:
    rate: float
    burst: float
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, rate: float, burst: int) -> float:
        """Spend one token of ``key``'s bucket: 0.0 if there was one, else the seconds until there is."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None or (bucket.rate, bucket.burst) != (rate, burst):
                # New key, or its limits changed (a reloaded key file): start it full.
                if len(self._buckets) >= _MAX_BUCKETS:
                    self._drop_full(now)
                bucket = self._buckets[key] = _Bucket(rate, float(burst), float(burst), now)
            bucket.tokens = min(bucket.burst, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate

    def close(self) -> None:
        pass

    def _drop_full(self, now: float) -> None:
        self._buckets = {key: b for key, b in self._buckets.items()
                         if b.tokens + (now - b.updated) * b.rate < b.burst}


def retry_after_header(wait_s: float) -> str:
    """Retry-After is whole seconds; rounding down would invite a retry that is refused again."""
    return str(max(1, math.ceil(wait_s)))
