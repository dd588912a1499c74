"""`streamguard worker --processes N` against a real broker: N consumer processes of one group in one pod,
under a supervisor that forwards SIGTERM, restarts a child that dies and serves the pod's health."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from images import encode, noise
from stack import (
    Topics,
    committed_offsets,
    image_events,
    produce,
    read_outcomes,
    wait_for_outcomes,
    worker_env,
)
from streamguard.devstack import Service, free_port


def _images(n: int, seed: int) -> list[bytes]:
    return [encode(noise((40, 32), seed=seed * 10_000 + i), "PNG") for i in range(n)]


class Pod:
    """`streamguard worker` with N processes, its log (the supervisor's and every child's) in one file."""

    def __init__(self, env: dict[str, str], log_dir: Path, processes: int | None = 2, name: str = "pod") -> None:
        self.health_port = free_port()
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        env = {**env, "STREAMGUARD_WORKER__HEALTH_PORT": str(self.health_port),
               "STREAMGUARD_WORKER__HEALTH_HOST": "127.0.0.1"}
        args = ["--processes", str(processes)] if processes is not None else []
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([sys.executable, "-m", "streamguard", "worker", *args], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if name is None or event.get("event") == name:
                    out.append(event)
        return out

    def wait_until(self, predicate, what: str, timeout: float = 90):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"pod exited ({self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {timeout}s:\n{self.tail()}")

    def children_pids(self) -> dict[int, int]:
        """Index -> pid of each child's latest start."""
        return {e["index"]: e["pid"] for e in self.events("supervisor.child_started")}

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except urllib.error.URLError:
            return 0, ""  # not listening yet

    def get_json(self, path: str) -> tuple[int, dict]:
        status, body = self.get(path)
        return status, json.loads(body) if body else {}

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.wait(10)
        # Children of a killed supervisor stop on their own (they watch their parent); never leave one.
        for pid in self.children_pids().values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def topics(kafka: Service) -> Topics:
    return Topics(kafka.address).create()


def _both_ready(pod: Pod) -> dict | None:
    status, body = pod.get_json("/readyz")
    return body if status == 200 and body["children_ready"] == 2 else None


def test_two_processes_judge_every_event_and_sigterm_drains_both(topics: Topics, tmp_path: Path) -> None:
    env = worker_env(topics, None, STREAMGUARD_DETECTORS__OPTIONS='{"brightness": {"delay_s": 0.02}}')
    pod = Pod(env, tmp_path, processes=2)
    try:
        ready = pod.wait_until(lambda: _both_ready(pod), "both children ready")
        sent = produce(topics, image_events(_images(60, seed=1)))
        outcomes = wait_for_outcomes(topics, sent)
        status, health = pod.get_json("/healthz")
        assert status == 200 and health["alive"] is True
        assert [c["state"] for c in health["children"]] == ["running", "running"]
        # The group split the partitions between the two children.
        ready = pod.wait_until(lambda: _both_ready(pod), "both children ready")
        assert ready["partitions_assigned"] == topics.partitions
        assert all(0 < c["partitions_assigned"] < topics.partitions for c in ready["children"])
        status, metrics = pod.get("/metrics")
        assert status == 200
        assert 'streamguard_events_in_total{worker_process="0"}' in metrics
        assert 'streamguard_events_in_total{worker_process="1"}' in metrics
        assert "streamguard_worker_processes 2.0" in metrics
        assert 'streamguard_stage_seconds_bucket{' in metrics
        pod.proc.send_signal(signal.SIGTERM)
        assert pod.wait(90) == 0, pod.tail()
    finally:
        pod.stop()
    assert sorted(outcomes.verdict_ids()) == sorted(s.event_id for s in sent)  # exactly N, each once
    assert not outcomes.dead_letters
    stopped = pod.events("worker.stopped")
    assert sorted(e["worker_process"] for e in stopped) == [0, 1]  # both children drained and exited
    assert all(e["drained"] for e in stopped)
    both = {e["worker_process"] for e in pod.events("worker.partitions_assigned") if e["partitions"]}
    assert both == {0, 1}
    # Everything was finished, so everything is committed: nothing is redelivered after a clean stop.
    # (Against the positions the records landed at: Tansu's end offsets can be short of the true end.)
    ends: dict[int, int] = {}
    for s in sent:
        ends[s.partition] = max(ends.get(s.partition, 0), s.offset + 1)
    assert {p: o for p, o in committed_offsets(topics).items() if o} == ends
    assert pod.events("supervisor.stopped")[-1]["exit_code"] == 0


def test_sigkill_of_one_child_loses_nothing_and_it_is_restarted(topics: Topics, tmp_path: Path) -> None:
    """The supervisor's policy: a child that dies is restarted after a backoff; the other keeps judging,
    the group hands the dead child's partitions over, its uncommitted records are redelivered."""
    env = worker_env(topics, None, STREAMGUARD_DETECTORS__OPTIONS='{"brightness": {"delay_s": 0.05}}',
                     STREAMGUARD_WORKER__PROCESSES="2")  # the setting, not the flag
    sent = produce(topics, image_events(_images(160, seed=2)))
    pod = Pod(env, tmp_path, processes=None)
    try:
        pod.wait_until(lambda: len(read_outcomes(topics).verdicts) >= 20, "20 verdicts")
        victim = pod.children_pids()[0]
        os.kill(victim, signal.SIGKILL)
        exited = pod.wait_until(lambda: pod.events("supervisor.child_exited"), "child_exited")
        assert exited[0]["index"] == 0 and exited[0]["status"] == "signal SIGKILL"
        assert exited[0]["action"] == "restart"
        pod.wait_until(lambda: [e for e in pod.events("supervisor.child_started") if e["restarts"] == 1],
                       "the restart")
        assert pod.children_pids()[0] != victim
        outcomes = wait_for_outcomes(topics, sent, timeout=150)
        pod.wait_until(lambda: _both_ready(pod), "both children ready again")
        status, health = pod.get_json("/healthz")
        assert status == 200 and health["children"][0]["restarts"] == 1
        _, metrics = pod.get("/metrics")
        assert "streamguard_worker_process_restarts_total 1.0" in metrics
        pod.proc.send_signal(signal.SIGTERM)
        assert pod.wait(90) == 0, pod.tail()
    finally:
        pod.stop()
    assert set(outcomes.verdict_ids()) == {s.event_id for s in sent}  # none lost; duplicates allowed


def test_pod_health_is_every_child_alive_and_any_child_ready(topics: Topics, tmp_path: Path) -> None:
    """A child whose poll loop stalls (here: frozen with SIGSTOP) fails the pod's liveness after
    worker.liveness_timeout_s, while the pod stays ready through the other child; thawed, it is alive."""
    env = worker_env(topics, None, STREAMGUARD_WORKER__LIVENESS_TIMEOUT_S="3")
    pod = Pod(env, tmp_path, processes=2)
    frozen = None
    try:
        pod.wait_until(lambda: _both_ready(pod), "both children ready")
        frozen = pod.children_pids()[1]
        os.kill(frozen, signal.SIGSTOP)

        def stale() -> dict | None:
            # On a loaded machine the other child can miss a beat too; what must come is this state.
            status, body = pod.get_json("/healthz")
            return body if status == 503 and [c["alive"] for c in body["children"]] == [True, False] else None

        pod.wait_until(stale, "/healthz 503 with only the frozen child dead", timeout=45)

        def one_ready() -> dict | None:
            status, body = pod.get_json("/readyz")
            return body if status == 200 and [c["ready"] for c in body["children"]] == [True, False] else None

        pod.wait_until(one_ready, "/readyz 200 with one child ready", timeout=30)
        os.kill(frozen, signal.SIGCONT)
        frozen = None
        pod.wait_until(lambda: pod.get("/healthz")[0] == 200, "/healthz 200 again", timeout=30)
        pod.proc.send_signal(signal.SIGTERM)
        assert pod.wait(90) == 0, pod.tail()
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        pod.stop()


def test_a_child_that_keeps_failing_stops_the_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarts back off; after 5 failures in a row the supervisor gives up and exits 1 (no broker needed:
    every child fails at start, with no fusion plugin to judge with)."""
    from streamguard.config import load_settings
    from streamguard.worker import supervisor as supervisor_module

    monkeypatch.setattr(supervisor_module, "_BACKOFF_FIRST_S", 0.05)
    monkeypatch.setenv("STREAMGUARD_PLUGINS__ALLOW", '["nothing"]')
    monkeypatch.setenv("STREAMGUARD_LOG__FORMAT", "json")
    settings = load_settings(worker={"health_host": "127.0.0.1", "health_port": 0})
    sup = supervisor_module.Supervisor(settings, 2)
    started = time.monotonic()
    assert sup.run() == 1
    assert time.monotonic() - started < 120
    assert sum(c.restarts for c in sup.children) >= supervisor_module._MAX_FAILURES_IN_A_ROW


def test_an_unreachable_broker_stops_the_pod_with_2(tmp_path: Path) -> None:
    """As a single worker: the children say `kafka.unreachable` and exit 2; the pod does not retry."""
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMGUARD_")}
    env |= {"STREAMGUARD_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "STREAMGUARD_KAFKA__BOOTSTRAP_TIMEOUT_S": "3",
            "STREAMGUARD_LOG__FORMAT": "json", "STREAMGUARD_DEDUPE__ENABLED": "false",
            "STREAMGUARD_PLUGINS__DENY": '["builtin-univfd", "builtin-pinclip", "builtin-mpft"]'}
    pod = Pod(env, tmp_path, processes=2)
    try:
        assert pod.wait(90) == 2, pod.tail()
    finally:
        pod.stop()
    assert pod.events("kafka.unreachable")
    assert pod.events("supervisor.stopped")[-1]["exit_code"] == 2
    assert not [e for e in pod.events("supervisor.child_started") if e["restarts"]]


def test_children_metrics_merge_with_a_label() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from streamguard.worker.supervisor import _merge_metrics

    texts = []
    for index in range(2):
        registry = CollectorRegistry()
        Counter("sg_things", "Things.", ["kind"], registry=registry).labels("a").inc(index + 1)
        Histogram("sg_seconds", "Seconds.", registry=registry, buckets=(0.1, 1.0)).observe(0.5)
        texts.append((index, generate_latest(registry).decode()))
    merged = _merge_metrics(texts).decode()
    assert merged.count("# TYPE sg_things_total counter") == 1
    assert 'sg_things_total{kind="a",worker_process="0"} 1.0' in merged
    assert 'sg_things_total{kind="a",worker_process="1"} 2.0' in merged
    assert 'sg_seconds_bucket{le="1.0",worker_process="1"} 1.0' in merged
