"""Helpers for the stream tests: topics, worker processes, and the stream harness of `streamguard.streamio`
bound to a test's topics (producing events, reading every outcome back, offsets).

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
from typing import Any

from streamguard import streamio
from streamguard.devstack import create_topics, free_port
from streamguard.streamio import (
    Message,
    Outcomes,
    Sent,
    image_messages,
    missing,  # noqa: F401 - the stream tests import it from here
)
from streamguard.wire import Encoding


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


# The policy the tests script their detectors' logits against (the test detectors' scores are chosen to fall
# on either side of these), pinned so that re-validating the shipped thresholds and fused calibration
# (docs/validation.md) does not move a test's labels. tests/test_config.py checks the shipped defaults.
TEST_POLICY = {
    "STREAMGUARD_POLICY__AI_THRESHOLD": "0.99",
    "STREAMGUARD_POLICY__REAL_THRESHOLD": "0.5",
    "STREAMGUARD_FUSION__SCALE": "1.0",
    "STREAMGUARD_FUSION__BIAS": "0.0",
}


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
        **TEST_POLICY,
    })
    if redis_url is None:
        env["STREAMGUARD_DEDUPE__ENABLED"] = "false"
    else:
        env["STREAMGUARD_REDIS__URL"] = redis_url
        env["STREAMGUARD_DEDUPE__NAMESPACE"] = topics.prefix
    env.update(extra)
    return env


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "worker", python: str = sys.executable) -> None:
        """``python``: the interpreter to run it with (another venv's, as tests/test_lean_env.py does)."""
        self.health_port = free_port()
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        env = {**env, "STREAMGUARD_WORKER__HEALTH_PORT": str(self.health_port),
               "STREAMGUARD_WORKER__HEALTH_HOST": "127.0.0.1"}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([python, "-m", "streamguard", "worker"], env=env,
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


def _config(topics: Topics) -> dict[str, Any]:
    return {"bootstrap_servers": topics.bootstrap}


def produce(topics: Topics, items: Iterable[Message], compression_type: str | None = None) -> list[Sent]:
    """Send raw (event id, value, headers) records to the input topic; returns where each landed."""
    config = {**_config(topics), "max_request_size": 30 * 1024 * 1024, "compression_type": compression_type}
    return streamio.produce(config, topics.input, items)


def image_events(images: Iterable[bytes], encoding: Encoding = "binary", prefix: str = "e") -> list[Message]:
    return image_messages(images, encoding, prefix)


def read_outcomes(topics: Topics) -> Outcomes:
    return streamio.read_outcomes(_config(topics), topics.output, topics.dlq)


def wait_for_outcomes(topics: Topics, sent: list[Sent], timeout: float = 90) -> Outcomes:
    """Until every sent record has a verdict (by event id) or a dead letter (by position)."""
    return streamio.wait_for_outcomes(_config(topics), topics.output, topics.dlq, sent, timeout)


def committed_offsets(topics: Topics) -> dict[int, int]:
    committed = streamio.committed_offsets(_config(topics), topics.group, topics.input)
    return {p: offset or 0 for p, offset in committed.items()}


def end_offsets(topics: Topics) -> dict[int, int]:
    return streamio.end_offsets(_config(topics), topics.input)
