"""Rate limits shared through Redis: replicas spend one budget per key, and a Redis outage falls back to local
limits instead of failing requests.

Every limiter here talks to a real Redis (the session's, or one a test starts and stops itself). Timing
assertions are bounds computed from the time the test measured, never a fixed wall-clock expectation.
"""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from structlog.testing import capture_logs

from images import encode, solid
from streamguard.config import RedisSettings, Settings, load_settings
from streamguard.devstack import Service, start_redis
from streamguard.plugins import build_plugin_manager
from streamguard.serve.app import CheckService
from streamguard.serve.ratelimit import RateLimiter
from streamguard.serve.ratelimit_redis import RedisRateLimiter, open_limiter

KEY = "sg-rl-key-0123456789abcdef"


def redis_settings(redis_service: Service, **extra: Any) -> RedisSettings:
    return RedisSettings(url=f"redis://{redis_service.address}/0", **extra)


def namespace() -> str:
    return f"rl{uuid.uuid4().hex[:8]}"


class Fallbacks(Counter[str]):
    def __call__(self, reason: str) -> None:
        self[reason] += 1


def drain(limiter: RedisRateLimiter, key: str, rate: float, burst: int) -> int:
    """Take until refused; the tokens granted."""
    granted = 0
    while limiter.take(key, rate, burst) == 0.0:
        granted += 1
        assert granted <= burst, "granted more than the burst"
    return granted


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the limiter ----------------------------------------------------------------------------------------


def test_two_replicas_sharing_redis_grant_one_burst_not_two(redis_service: Service) -> None:
    ns, fallbacks = namespace(), Fallbacks()
    replicas = [RedisRateLimiter(redis_settings(redis_service), ns, fallbacks) for _ in range(2)]
    # 0.001/s: no token comes back during the test, so every grant is from the burst.
    rate, burst = 0.001, 7
    takes = [(replicas[i % 2], i) for i in range(60)]
    with ThreadPoolExecutor(8) as pool:  # concurrently, as two pods' request threads would
        waits = list(pool.map(lambda t: t[0].take("key:shop", rate, burst), takes))
    assert sum(w == 0.0 for w in waits) == burst
    refused = [w for w in waits if w > 0]
    assert len(refused) == 60 - burst and all(0 < w <= 1 / rate for w in refused)
    assert not fallbacks  # every answer came from Redis
    # Another key has its own budget, in the same Redis.
    assert replicas[1].take("key:other", rate, burst) == 0.0
    # What the shared store prevents: two in-process limiters grant a burst each.
    local = [RateLimiter(), RateLimiter()]
    assert sum(local[i % 2].take("key:shop", rate, burst) == 0.0 for i in range(60)) == 2 * burst
    for replica in replicas:
        replica.close()


def test_tokens_come_back_at_the_rate(redis_service: Service) -> None:
    a = RedisRateLimiter(redis_settings(redis_service), ns := namespace())
    b = RedisRateLimiter(redis_settings(redis_service), ns)
    rate, burst = 4.0, 5
    started = time.monotonic()
    assert drain(a, "k", rate, burst) == burst
    drained = time.monotonic()
    wait = b.take("k", rate, burst)
    assert 0 < wait <= 1 / rate  # the 429's Retry-After: the next token, a quarter second away at most
    time.sleep(0.6)
    before = time.monotonic()
    granted = drain(b, "k", rate, burst)
    after = time.monotonic()
    # At least what came back between the last grant and the new takes; at most what a bucket full at the
    # start can give over the whole test, burst + elapsed * rate (0.05 s for Redis's clock against ours).
    assert min(burst, int((before - drained) * rate)) <= granted <= int((after - started + 0.05) * rate)
    assert granted >= 2  # 0.6 s at 4/s
    a.close()
    b.close()


def test_idle_buckets_expire_and_come_back_full(redis_service: Service) -> None:
    limiter = RedisRateLimiter(redis_settings(redis_service), ns := namespace())
    client = Redis.from_url(f"redis://{redis_service.address}/0")
    rate, burst = 10.0, 2
    assert limiter.take("key:shop", rate, burst) == 0.0
    ttl_ms = client.pttl(limiter.redis_key("key:shop"))
    assert 0 < ttl_ms <= 1000 * burst / rate  # until the bucket is full again, no longer
    assert drain(limiter, "key:shop", rate, burst) == 1
    # The name is hashed: neither the key's name nor a client address is written to Redis.
    stored = [k.decode() for k in client.scan_iter(f"{ns}:*")]
    assert stored == [limiter.redis_key("key:shop")] and "shop" not in stored[0]
    deadline = time.monotonic() + 5
    while client.exists(limiter.redis_key("key:shop")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.exists(limiter.redis_key("key:shop"))
    assert drain(limiter, "key:shop", rate, burst) == burst
    limiter.close()
    client.close()


def test_unreachable_redis_falls_back_to_the_local_limit(tmp_path: Path) -> None:
    fallbacks = Fallbacks()
    settings = RedisSettings(url=f"redis://127.0.0.1:{closed_port()}/0", retry_interval_s=60)
    limiter = RedisRateLimiter(settings, namespace(), fallbacks)
    with capture_logs() as logs:
        waits = [limiter.take("key:shop", 0.001, 3) for _ in range(10)]
    assert waits[:3] == [0.0] * 3 and all(w > 0 for w in waits[3:])  # limited locally, not unlimited
    assert fallbacks == {"unreachable": 10}
    assert [e["event"] for e in logs] == ["serve.ratelimit_redis_down"]  # once, not per request
    limiter.close()


def test_a_redis_that_stops_and_comes_back(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    fallbacks = Fallbacks()
    limiter = RedisRateLimiter(redis_settings(redis, retry_interval_s=0.2), namespace(), fallbacks)
    try:
        assert limiter.take("key:shop", 0.001, 2) == 0.0
        redis.stop()
        with capture_logs() as logs:
            # The local bucket is its own: a full burst, then refusals.
            waits = [limiter.take("key:shop", 0.001, 2) for _ in range(4)]
        assert waits[:2] == [0.0, 0.0] and all(w > 0 for w in waits[2:])
        assert fallbacks["unreachable"] == 4
        assert [e["event"] for e in logs] == ["serve.ratelimit_redis_down"]

        redis = start_redis(tmp_path, port=redis.port)
        time.sleep(0.25)  # past the retry interval
        with capture_logs() as logs:
            assert limiter.take("key:other", 0.001, 2) == 0.0
        assert [e["event"] for e in logs] == ["serve.ratelimit_redis_up"]
        assert fallbacks["unreachable"] == 4
        with Redis.from_url(f"redis://{redis.address}/0") as client:
            assert client.exists(limiter.redis_key("key:other"))  # back on the shared bucket
    finally:
        limiter.close()
        redis.stop()


def test_an_error_from_redis_limits_that_request_locally(redis_service: Service) -> None:
    fallbacks = Fallbacks()
    limiter = RedisRateLimiter(redis_settings(redis_service), namespace(), fallbacks)
    with Redis.from_url(f"redis://{redis_service.address}/0") as client:
        client.hset(limiter.redis_key("key:shop"), "not", "a bucket")  # WRONGTYPE for the script's GET
        with capture_logs() as logs:
            waits = [limiter.take("key:shop", 0.001, 2) for _ in range(3)]
        assert waits[:2] == [0.0, 0.0] and waits[2] > 0
        assert fallbacks == {"error": 3}
        assert [e["event"] for e in logs] == ["serve.ratelimit_redis_error"]  # the repeats are suppressed
        assert limiter.take("key:other", 0.001, 2) == 0.0 and fallbacks == {"error": 3}  # Redis is not "down"
        client.delete(limiter.redis_key("key:shop"))
    limiter.close()


def test_the_store_follows_the_settings(redis_service: Service) -> None:
    redis = {"url": f"redis://{redis_service.address}/0"}
    assert isinstance(open_limiter(load_settings(redis=redis)), RedisRateLimiter)  # auto, dedupe on
    assert isinstance(open_limiter(load_settings(redis=redis, dedupe={"enabled": False})), RateLimiter)
    assert isinstance(open_limiter(load_settings(dedupe={"enabled": False}, serve={"rate_limit_store": "redis"})),
                      RedisRateLimiter)
    assert isinstance(open_limiter(load_settings(redis=redis, serve={"rate_limit_store": "local"})), RateLimiter)


# -- two `serve` replicas -------------------------------------------------------------------------------


def replica_settings(redis_service: Service, ns: str, store: str) -> Settings:
    return load_settings(
        serve={"host": "127.0.0.1", "port": 0, "rate_limit_store": store,
               "api_keys": [{"name": "shop", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                             "rate_per_s": 0.01, "burst": 3}]},
        worker={"health_host": "127.0.0.1", "health_port": 0},
        redis={"url": f"redis://{redis_service.address}/0"},
        dedupe={"namespace": ns},
        plugins={"deny": ["builtin-univfd", "builtin-pinclip", "builtin-mpft"]},
    )


@pytest.fixture
def replicas(request: pytest.FixtureRequest, redis_service: Service) -> Iterator[list[CheckService]]:
    settings = replica_settings(redis_service, namespace(), request.param)
    with ExitStack() as stack:
        services = []
        for _ in range(2):
            service = CheckService(settings, build_plugin_manager(settings.plugins)).start()
            stack.callback(service.stop, drain_s=5)
            services.append(service)
        yield services


@pytest.mark.parametrize(("replicas", "granted"), [("redis", 3), ("local", 6)], indirect=["replicas"])
def test_a_key_gets_its_burst_across_replicas(replicas: list[CheckService], granted: int) -> None:
    statuses, retry_after = [], []
    with httpx.Client() as client:
        for i in range(10):
            service = replicas[i % 2]  # round robin, as a load balancer would
            answer = client.post(f"http://127.0.0.1:{service.port}/v1/check", content=encode(solid(i * 20), "PNG"),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "image/png"})
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                retry_after.append(int(answer.headers["Retry-After"]))
    assert statuses.count(200) == granted and statuses.count(429) == 10 - granted
    assert all(1 <= s <= 100 for s in retry_after)  # a token every 100 s at 0.01/s
    for service in replicas:
        sample = service.metrics.worker.registry.get_sample_value
        assert sample("streamguard_http_ratelimit_fallbacks_total", {"reason": "unreachable"}) == 0.0
