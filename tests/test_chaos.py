"""Chaos under load against the real broker and a real Redis: workers SIGKILLed three times, Redis frozen
(SIGSTOP) and resumed, a header bomb and a poisoned cache mid-stream. Every event must end as a verdict
or a dead letter; none may be lost (duplicates are allowed: delivery is at-least-once)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from images import encode, noise
from stack import Topics, WorkerProcess, image_events, produce, read_outcomes, wait_for_outcomes, worker_env
from streamguard.devstack import Service, start_redis
from streamguard.streamio import Message, missing


def _images(n: int, seed: int) -> list[bytes]:
    return [encode(noise((40, 32), seed=seed * 1000 + i), "PNG") for i in range(n)]


def _wait_verdicts(topics: Topics, at_least: int, workers: dict[str, WorkerProcess], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while (seen := len(read_outcomes(topics).verdicts)) < at_least:
        assert time.monotonic() < deadline, f"{seen} of {at_least} verdicts\n" + _log_tails(workers)
        time.sleep(0.2)


def _log_tails(workers: dict[str, WorkerProcess]) -> str:
    """Every worker's last lifecycle events: which one holds which partitions, and what it last did."""
    lines = []
    for name, worker in workers.items():
        events = [e for e in worker.events() if e.get("level") != "debug"]
        lines.append(f"--- {name} (exit {worker.proc.poll()}): {len(events)} events")
        lines += [json.dumps(e)[:300] for e in events[-12:]]
    return "\n".join(lines)


def _poison_cache(redis: Service, namespace: str) -> int:
    """Rewrite every cached verdict as a newer release would write it (one extra field)."""
    import redis as redis_py

    client = redis_py.Redis(host="127.0.0.1", port=redis.port, decode_responses=True)
    poisoned = 0
    for key in client.scan_iter(f"{namespace}:v:*"):
        raw = client.get(key)
        if raw is not None:
            client.set(key, json.dumps({**json.loads(raw), "added_in_a_newer_release": 1}), keepttl=True)
            poisoned += 1
    client.close()
    return poisoned


def test_kills_frozen_redis_header_bomb_and_cache_poison_lose_nothing(kafka: Service, tmp_path: Path) -> None:
    topics = Topics(kafka.address, partitions=4).create()
    redis = start_redis(tmp_path / "redis")
    env = worker_env(topics, f"redis://{redis.address}/0",
                     STREAMGUARD_DETECTORS__OPTIONS='{"brightness": {"delay_s": 0.02}}',
                     STREAMGUARD_REDIS__RETRY_INTERVAL_S="0.5",
                     STREAMGUARD_DEDUPE__LEASE_MS="2000",
                     STREAMGUARD_WORKER__MAX_HEADER_BYTES=str(64 * 1024))
    workers = {name: WorkerProcess(env, tmp_path, name) for name in ("a", "b")}
    first_wave = _images(60, seed=1)
    sent = []
    kills = 0
    try:
        sent += produce(topics, image_events(first_wave, prefix="w1"))
        _wait_verdicts(topics, 10, workers)
        workers["a"].kill()
        kills += 1
        workers["a2"] = WorkerProcess(env, tmp_path, "a2")

        # Redis frozen: commands time out instead of failing fast. A header bomb arrives meanwhile.
        os.killpg(redis.pid, signal.SIGSTOP)
        bomb: Message = ("bomb", b"x", [("sg-encoding", b"binary"), ("sg-event-id", b"bomb"),
                                        ("x-bomb", b"\x00" * (4 * 1024 * 1024))])
        sent += produce(topics, [*image_events(_images(30, seed=2), prefix="w2")[:15], bomb,
                                 *image_events(_images(30, seed=2), prefix="w2")[15:]])
        time.sleep(3)
        workers["b"].kill()
        kills += 1
        workers["b2"] = WorkerProcess(env, tmp_path, "b2")
        os.killpg(redis.pid, signal.SIGCONT)

        wait_for_outcomes(topics, sent, timeout=120)
        assert _poison_cache(redis, topics.prefix) > 0
        # Copies of content whose cached verdicts are now unreadable: they must be judged again.
        sent += produce(topics, image_events(first_wave[:30] + _images(30, seed=3), prefix="w3"))
        _wait_verdicts(topics, len(sent) - 5, workers)
        workers["a2"].kill()
        kills += 1
        workers["a3"] = WorkerProcess(env, tmp_path, "a3")
        outcomes = wait_for_outcomes(topics, sent, timeout=120)
    finally:
        os.killpg(redis.pid, signal.SIGCONT)
        alive = [w for w in workers.values() if w.proc.poll() is None]
        for w in alive:
            w.wait_for_event("worker.started")  # a SIGTERM before the handler is installed kills it outright
            w.signal(signal.SIGTERM)
        codes = [w.wait(60) for w in alive]
        redis.stop()
    assert kills == 3 and codes == [0] * len(codes)
    assert not missing(sent, outcomes)
    letters = [d for d in outcomes.dead_letters if d.get("event_id") == "bomb" or d["error_type"] == "HeadersTooLarge"]
    assert [d["error_type"] for d in letters] and {d["error_type"] for d in letters} == {"HeadersTooLarge"}
    assert {d["error_type"] for d in outcomes.dead_letters} == {"HeadersTooLarge"}
    w3 = {v["event_id"]: v for v in outcomes.verdicts if v["event_id"].startswith("w3-")}
    assert len(w3) == 60
    logs = [e for w in workers.values() for e in w.events()]
    assert any(e.get("event") == "dedupe.cache_unreadable" for e in logs)
    assert not any(e.get("event") == "worker.batch_failed" for e in logs)
