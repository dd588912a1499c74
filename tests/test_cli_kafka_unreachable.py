"""Commands that talk to Kafka, run as a user runs them, against a loopback port nothing listens on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import WITHOUT_UNIVFD

COMMANDS = {
    "worker": ["worker"],
    "produce": ["produce", str(Path(__file__))],  # any file: the broker is never reached
    "tail": ["tail", "--count", "1"],
}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[subprocess.CompletedProcess[str], float, str]]:
    """All three at once: each waits out the bootstrap timeout (`kafka.bootstrap_timeout_s`, 3 s here)."""
    bootstrap = f"127.0.0.1:{closed_port()}"
    # Module-scoped, so conftest's per-test environment is not in place yet: build it here.
    env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMGUARD_")}
    env |= {"STREAMGUARD_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "STREAMGUARD_LOG__FORMAT": "json",
            "STREAMGUARD_WORKER__HEALTH_PORT": "0", "STREAMGUARD_DEDUPE__ENABLED": "false",
            "STREAMGUARD_PLUGINS__DENY": WITHOUT_UNIVFD, "STREAMGUARD_KAFKA__BOOTSTRAP_TIMEOUT_S": "3"}
    started = time.monotonic()
    procs = {name: subprocess.Popen([sys.executable, "-m", "streamguard", *args], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
             for name, args in COMMANDS.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                         time.monotonic() - started, bootstrap)
    return results


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unreachable_broker_is_one_error_line_and_exit_2(
    command: str, runs: dict[str, tuple[subprocess.CompletedProcess[str], float, str]]
) -> None:
    proc, seconds, bootstrap = runs[command]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]  # JSON, every one
    ours = [line for line in lines if line["event"] == "kafka.unreachable"]
    assert len(ours) == 1, proc.stderr[-3000:]
    (error,) = ours
    assert error["level"] == "error" and error["command"] == command
    assert error["bootstrap_servers"] == bootstrap
    assert "KafkaTimeoutError" in error["reason"] and bootstrap in error["reason"]
    # The configured bootstrap timeout is what it waits (kafka-python's own default is 30 s).
    assert seconds < 28
