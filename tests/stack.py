"""Helpers for the stream tests: worker processes, producing events, and reading every outcome back.

Services come from `streamguard.devstack`, the same code as `streamguard dev up`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamguard.devstack import create_topics, free_port
from streamguard.schemas import ImageEvent
from streamguard.wire import Encoding, encode_event


@dataclass
class Topics:
    bootstrap: str
    partitions: int = 4
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")

    @property
    def input(self) -> str:
        return f"{self.prefix}.images"

    @property
    def output(self) -> str:
        return f"{self.prefix}.verdicts"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def group(self) -> str:
        return f"{self.prefix}.group"

    def create(self) -> Topics:
        create_topics(self.bootstrap, {self.input: self.partitions, self.output: self.partitions, self.dlq: 1})
        return self


def worker_env(topics: Topics, redis_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGUARD_")}
    env.update({
        "STREAMGUARD_KAFKA__BOOTSTRAP_SERVERS": topics.bootstrap,
        "STREAMGUARD_WORKER__INPUT_TOPIC": topics.input,
        "STREAMGUARD_WORKER__OUTPUT_TOPIC": topics.output,
        "STREAMGUARD_WORKER__DEAD_LETTER_TOPIC": topics.dlq,
        "STREAMGUARD_WORKER__GROUP_ID": topics.group,
        # Short group timeouts so rebalances after a kill take seconds, not minutes.
        "STREAMGUARD_WORKER__SESSION_TIMEOUT_MS": "6000",
        "STREAMGUARD_WORKER__HEARTBEAT_INTERVAL_MS": "1000",
        "STREAMGUARD_WORKER__MAX_POLL_INTERVAL_MS": "10000",
        "STREAMGUARD_WORKER__COMMIT_INTERVAL_S": "0.5",
        "STREAMGUARD_WORKER__BATCH_SIZE": "8",
        "STREAMGUARD_LOG__FORMAT": "json",
        # The CLIP detectors are tested on their own (~0.7 s an image each on this CPU).
        "STREAMGUARD_PLUGINS__DENY": '["builtin-univfd", "builtin-pinclip", "builtin-mpft"]',
        "PYTHONUNBUFFERED": "1",
    })
    if redis_url is None:
        env["STREAMGUARD_DEDUPE__ENABLED"] = "false"
    else:
        env["STREAMGUARD_REDIS__URL"] = redis_url
        env["STREAMGUARD_DEDUPE__NAMESPACE"] = topics.prefix
    env.update(extra)
    return env


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "worker") -> None:
        self.health_port = free_port()
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        env = {**env, "STREAMGUARD_WORKER__HEALTH_PORT": str(self.health_port),
               "STREAMGUARD_WORKER__HEALTH_HOST": "127.0.0.1"}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([sys.executable, "-m", "streamguard", "worker"], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait_for_event(self, name: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {name} within {timeout}s:\n{self.log_path.read_text()[-3000:]}")


@dataclass
class Sent:
    event_id: str | None
    partition: int
    offset: int


def produce(topics: Topics, items: Iterable[tuple[str | None, bytes, list[tuple[str, bytes]]]]) -> list[Sent]:
    """Send raw (key, value, headers) records; returns where each landed."""
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap, max_request_size=30 * 1024 * 1024)
    futures = []
    for event_id, value, headers in items:
        key = event_id.encode() if event_id else None
        futures.append((event_id, producer.send(topics.input, key=key, value=value, headers=headers)))
    producer.flush()
    sent = []
    for event_id, future in futures:
        meta = future.get(timeout=30)
        sent.append(Sent(event_id, meta.partition, meta.offset))
    producer.close()
    return sent


def image_events(images: Iterable[bytes], encoding: Encoding = "binary", prefix: str = "e") -> list[tuple[str, bytes, list]]:
    out = []
    for i, data in enumerate(images):
        event = ImageEvent(event_id=f"{prefix}-{i}", image=data)
        value, headers = encode_event(event, encoding)
        out.append((event.event_id, value, headers))
    return out


@dataclass
class Outcomes:
    verdicts: list[dict]
    dead_letters: list[dict]  # the DeadLetter JSON from the header, plus "value_len"

    def verdict_ids(self) -> list[str]:
        return [v["event_id"] for v in self.verdicts]

    def dead_positions(self) -> set[tuple[int, int]]:
        return {(d["original_partition"], d["original_offset"]) for d in self.dead_letters}


def read_outcomes(topics: Topics) -> Outcomes:
    consumer = KafkaConsumer(bootstrap_servers=topics.bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(t, p) for t in (topics.output, topics.dlq)
           for p in sorted(consumer.partitions_for_topic(t) or ())]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ends = consumer.end_offsets(tps)
    verdicts, dead = [], []
    deadline = time.monotonic() + 30
    while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=200).items():
            for record in records:
                if tp.topic == topics.output:
                    verdicts.append(json.loads(record.value))
                else:
                    headers = dict(record.headers or ())
                    letter = json.loads(headers["sg-dead-letter"])
                    letter["value_len"] = len(record.value or b"")
                    letter["headers"] = {k: v.decode("utf-8", "replace") for k, v in headers.items()}
                    dead.append(letter)
    consumer.close()
    return Outcomes(verdicts, dead)


def wait_for_outcomes(topics: Topics, sent: list[Sent], timeout: float = 90) -> Outcomes:
    """Until every sent record has a verdict (by event id) or a dead letter (by position)."""
    deadline = time.monotonic() + timeout
    while True:
        outcomes = read_outcomes(topics)
        if not missing(sent, outcomes):
            return outcomes
        if time.monotonic() > deadline:
            raise AssertionError(f"missing outcomes for {missing(sent, outcomes)[:10]}")
        time.sleep(0.5)


def missing(sent: list[Sent], outcomes: Outcomes) -> list[Sent]:
    ids, dead = set(outcomes.verdict_ids()), outcomes.dead_positions()
    return [s for s in sent if s.event_id not in ids and (s.partition, s.offset) not in dead]


def committed_offsets(topics: Topics) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=topics.bootstrap, group_id=topics.group, enable_auto_commit=False)
    out = {}
    for p in sorted(consumer.partitions_for_topic(topics.input) or ()):
        out[p] = consumer.committed(TopicPartition(topics.input, p)) or 0
    consumer.close()
    return out


def end_offsets(topics: Topics) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=topics.bootstrap)
    tps = [TopicPartition(topics.input, p) for p in sorted(consumer.partitions_for_topic(topics.input) or ())]
    ends = consumer.end_offsets(tps)
    consumer.close()
    return {tp.partition: offset for tp, offset in ends.items()}
