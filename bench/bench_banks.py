"""Hash-bank benchmark: Redis memory per million banked items, the near index's memory, and match latency
(p50/p99), against a linear scan over the same hashes measured in the same run.

    .venv/bin/python bench/bench_banks.py [--sizes 1M] [--index-sizes 10M] [--queries 2000]
        [--baseline-queries 20] [--redis-url URL] [--out bench/results/banks.json]

``--sizes``: the whole path. N items (random SHA-256 and random PDQ, quality 90, one bank) are banked
through `BankStore.add_many` into a Redis of the bench's own (`streamguard.devstack`, flushed before each
size; ``--redis-url`` uses another, and flushes it too) and measured by ``INFO memory`` ``used_memory``
before and after; a worker's store is then opened with `open_banks` (load time, index bytes, process RSS
growth) and `BankStore.match` is timed per query: near hits (a banked hash with 0-31 random bits flipped,
the SHA-256 unbanked, so the exact lookup runs and misses first), misses (random hashes), and exact hits.

``--index-sizes``: the near index alone, built from N random hashes in memory (no Redis). Banking 10M
items through Redis takes about 8 minutes on this shared 2-core machine, so the default run measures Redis
at 1M and the index at 1M and 10M; ``--sizes 10M`` measures the whole path at 10M (README: 129 MiB of
Redis a million there, against 186 at 1M, as fixed costs spread over more items).

The baseline is a linear scan in numpy over the same hashes (XOR and a 16-bit popcount table, 1M rows at a
time), on ``--baseline-queries`` of the near-hit queries; the bench checks that both find the same
distance for each. The ratio is the baseline's p50 over the index's p50 (both in memory, near lookups).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis

from streamguard.banks import BankEntry, BankStore, open_banks
from streamguard.banks.index import _POPCOUNT16, NO_RANK, NearIndex, Rows, hash_words
from streamguard.config import Settings, load_settings
from streamguard.dedupe.phash import PerceptualHash
from streamguard.devstack import start_redis

BANK = "bench-ai"
MAX_DISTANCE = 31
SCAN_ROWS = 1 << 20


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * scale)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "mean_ms": round(float(ms.mean()), 4), "n": len(ms)}


def random_hashes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32), dtype=np.uint8), rng.integers(0, 256, (n, 32), dtype=np.uint8)


def near_queries(bits: np.ndarray, count: int, seed: int) -> list[bytes]:
    """Banked hashes with 0..31 random bits flipped: each has a match within PDQ's distance."""
    rng = np.random.default_rng(seed)
    out = []
    for row in rng.integers(0, len(bits), count):
        q = bits[row].copy()
        for pos in rng.choice(256, size=int(rng.integers(0, MAX_DISTANCE + 1)), replace=False):
            q[pos // 8] ^= 1 << (7 - pos % 8)
        out.append(q.tobytes())
    return out


def linear_scan(words: np.ndarray, query: bytes) -> int | None:
    """The baseline: the smallest distance within MAX_DISTANCE by scanning every hash."""
    q = hash_words(query)[0]
    best = None
    for start in range(0, len(words), SCAN_ROWS):
        distances = _POPCOUNT16[words[start:start + SCAN_ROWS] ^ q].sum(axis=1, dtype=np.int32)
        low = int(distances.min())
        if low <= MAX_DISTANCE and (best is None or low < best):
            best = low
    return best


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def compare_with_baseline(index: NearIndex, words: np.ndarray, queries: list[bytes], rank: np.ndarray,
                          index_seconds: list[float]) -> dict[str, Any]:
    scan_seconds = []
    for query in queries:
        seconds, expected = timed(lambda q=query: linear_scan(words, q))
        scan_seconds.append(seconds)
        hit = index.nearest(query, MAX_DISTANCE, rank)
        if (hit.distance if hit else None) != expected:
            raise AssertionError(f"index and linear scan disagree: {hit} vs {expected}")
    baseline = percentiles(scan_seconds)
    ours = percentiles(index_seconds)
    return {"linear_scan": baseline, "ratio_vs_baseline": round(baseline["p50_ms"] / ours["p50_ms"], 1)}


def index_latencies(index: NearIndex, queries: list[bytes], rank: np.ndarray) -> list[float]:
    return [timed(lambda q=q: index.nearest(q, MAX_DISTANCE, rank))[0] for q in queries]


def bench_full(n: int, redis: Redis, url: str, args: argparse.Namespace) -> dict[str, Any]:
    redis.flushall()
    settings: Settings = load_settings(
        redis={"url": url, "socket_timeout_s": 60},
        banks={"definitions": {BANK: "ai_generated"}, "key_prefix": f"bench{uuid.uuid4().hex[:6]}",
               "refresh_interval_s": 0})
    bits, shas = random_hashes(n, seed=n)
    before = int(redis.info("memory")["used_memory"])

    def entries() -> Iterator[BankEntry]:
        for row in range(n):
            yield BankEntry(BANK, "ai_generated", sha256=shas[row].tobytes().hex(),
                            pdq=PerceptualHash(bits=bits[row].tobytes(), quality=90))

    writer = BankStore(settings)
    add_s, added = timed(lambda: writer.add_many(entries()))
    writer.close()
    assert added == n
    redis_bytes = int(redis.info("memory")["used_memory"]) - before

    rss_before = rss_bytes()
    load_s, store = timed(lambda: open_banks(settings))
    assert store is not None
    rss_growth = rss_bytes() - rss_before
    try:
        near = near_queries(bits, args.queries // 2, seed=1)
        misses = [bytes(q) for q in random_hashes(args.queries // 2, seed=2)[0]]
        other_sha = [os.urandom(32).hex() for _ in near]
        match_near = [timed(lambda q=q, s=s: store.match(s, PerceptualHash(q, 90), [BANK]))[0]
                      for q, s in zip(near, other_sha, strict=True)]
        match_miss = [timed(lambda q=q, s=s: store.match(s, PerceptualHash(q, 90), [BANK]))[0]
                      for q, s in zip(misses, other_sha, strict=True)]
        exact = [shas[row].tobytes().hex() for row in np.random.default_rng(3).integers(0, n, args.queries // 10)]
        match_exact = [timed(lambda s=s: store.match(s, None, [BANK]))[0] for s in exact]
        rank = np.full(1 << 16, NO_RANK, dtype=np.int32)
        rank[0] = 0
        index_near = index_latencies(store.index, near, rank)
        words = Rows.concat([store.index.main, store.index.delta]).words
        baseline = compare_with_baseline(store.index, words, near[:args.baseline_queries], rank,
                                         index_near)
        return {
            "items": n,
            "bank_add_s": round(add_s, 1), "bank_add_per_s": round(n / add_s),
            "redis_used_memory_bytes": redis_bytes,
            "redis_bytes_per_item": round(redis_bytes / n, 1),
            "redis_mib_per_million": round(redis_bytes / n * 1e6 / 2**20, 1),
            "index_load_s": round(load_s, 2),
            "index_bytes": store.index.nbytes(),
            "index_mib_per_million": round(store.index.nbytes() / n * 1e6 / 2**20, 1),
            "process_rss_growth_mib": round(rss_growth / 2**20, 1),
            "match_near_hit": percentiles(match_near), "match_miss": percentiles(match_miss),
            "match_exact_hit": percentiles(match_exact), "index_near": percentiles(index_near), **baseline,
        }
    finally:
        store.close()


def bench_index(n: int, args: argparse.Namespace) -> dict[str, Any]:
    bits, shas = random_hashes(n, seed=n)
    rss_before = rss_bytes()
    rows = Rows(words=hash_words(bits), banks=np.zeros(n, np.uint16), shas=shas, has_sha=np.ones(n, bool))
    build_s, index = timed(lambda: NearIndex.build(rows))
    rss_growth = rss_bytes() - rss_before
    rank = np.full(1 << 16, NO_RANK, dtype=np.int32)
    rank[0] = 0
    near = near_queries(bits, args.queries // 2, seed=1)
    misses = [bytes(q) for q in random_hashes(args.queries // 2, seed=2)[0]]
    index_near = index_latencies(index, near, rank)
    index_miss = index_latencies(index, misses, rank)
    del bits
    baseline = compare_with_baseline(index, rows.words, near[:args.baseline_queries], rank, index_near)
    return {
        "items": n, "index_build_s": round(build_s, 2), "index_bytes": index.nbytes(),
        "index_mib_per_million": round(index.nbytes() / n * 1e6 / 2**20, 1),
        "process_rss_growth_mib": round(rss_growth / 2**20, 1),
        "index_near": percentiles(index_near), "index_miss": percentiles(index_miss), **baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M", help="Comma-separated item counts through Redis (1M, 250K, ...).")
    parser.add_argument("--index-sizes", default="1M,10M", help="Comma-separated counts for the index alone.")
    parser.add_argument("--queries", type=int, default=2000, help="Timed matches per size (half near hits).")
    parser.add_argument("--baseline-queries", type=int, default=20, help="Queries the linear scan answers.")
    parser.add_argument("--redis-url", help="Use (and flush) this Redis instead of starting one.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/banks.json"))
    args = parser.parse_args()

    results: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                               "max_distance": MAX_DISTANCE, "full": [], "index_only": []}
    with tempfile.TemporaryDirectory() as workdir:
        service = None if args.redis_url else start_redis(Path(workdir))
        url = args.redis_url or f"redis://127.0.0.1:{service.port}/0"  # type: ignore[union-attr]
        redis = Redis.from_url(url, socket_timeout=120)
        try:
            for size in filter(None, args.sizes.split(",")):
                row = bench_full(parse_size(size), redis, url, args)
                results["full"].append(row)
                print(f"{row['items']:>10,} items via Redis: Redis {row['redis_mib_per_million']} MiB/M "
                      f"({row['redis_bytes_per_item']} B/item), index {row['index_mib_per_million']} MiB/M, "
                      f"match near p50 {row['match_near_hit']['p50_ms']} ms p99 {row['match_near_hit']['p99_ms']} "
                      f"ms, miss p50 {row['match_miss']['p50_ms']} ms, exact p50 {row['match_exact_hit']['p50_ms']} "
                      f"ms; index near p50 {row['index_near']['p50_ms']} ms vs linear scan "
                      f"{row['linear_scan']['p50_ms']} ms: {row['ratio_vs_baseline']}x", flush=True)
        finally:
            redis.close()
            if service is not None:
                service.stop()
    for size in filter(None, args.index_sizes.split(",")):
        row = bench_index(parse_size(size), args)
        results["index_only"].append(row)
        print(f"{row['items']:>10,} items, index alone: {row['index_mib_per_million']} MiB/M "
              f"(RSS +{row['process_rss_growth_mib']} MiB), build {row['index_build_s']} s, near p50 "
              f"{row['index_near']['p50_ms']} ms p99 {row['index_near']['p99_ms']} ms, miss p50 "
              f"{row['index_miss']['p50_ms']} ms; linear scan p50 {row['linear_scan']['p50_ms']} ms: "
              f"{row['ratio_vs_baseline']}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
