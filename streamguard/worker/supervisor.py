"""``streamguard worker --processes N``: N worker processes of one consumer group in one pod.

Python runs one thread of Python code at a time, so one worker process uses about one core whatever its
threads. N children use N cores. Each child is a full worker (``streamguard worker --processes 1``): its
own consumer, producer, scorer and detectors, so delivery stays at-least-once and the offset invariant is
exactly the single worker's (``loop.py``); the group spreads the partitions over the children as over any
workers. A child gets no more than its share of partitions: N above the partition count leaves some idle.

The supervisor:
- starts N children; each serves its own health and metrics on a loopback port it picks and reports
  back through a file, and stops by itself if the supervisor disappears (it watches its parent's pid);
- forwards SIGTERM and SIGINT to every child, waits for them to drain (``worker.drain_timeout_s`` plus
  a grace), kills a child that does not exit by then, and exits 0 only if every child exited 0;
- restarts a child that exits on its own (a crash, SIGKILL, an OOM kill): the rest keep working, the
  group hands the dead child's partitions over, and the records it had not committed are redelivered,
  so nothing is lost. The restart waits 1 s, doubling with each failure in a row up to 30 s; a child that
  ran 60 s resets the count. After 5 failures in a row of one child it gives up: it stops the others and
  exits 1, so the pod restarts (Kubernetes' CrashLoopBackOff is then visible). A child exiting 2 (the
  broker unreachable at start) stops the pod with 2 at once, as a single worker would;
- serves the pod's ``/healthz``, ``/readyz`` and ``/metrics`` on ``worker.health_host``:``health_port``,
  from the children's own endpoints, checked every half second: alive when every child's poll loop
  makes progress (a child that is starting or waiting for its restart counts as alive for
  ``worker.liveness_timeout_s``), ready when at least one child is ready; the metrics are every child's,
  each sample labelled ``worker_process``, plus the supervisor's (children running, restarts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from streamguard.config import Settings
from streamguard.worker.health import HealthServer, HealthState

log = structlog.get_logger(__name__)

KAFKA_UNREACHABLE_EXIT = 2  # as `streamguard.cli`: a child that cannot reach the broker stops the pod
_CHECK_INTERVAL_S = 0.5
_CHECK_TIMEOUT_S = 1.0
_METRICS_TIMEOUT_S = 3.0
_BACKOFF_FIRST_S = 1.0
_BACKOFF_MAX_S = 30.0
_STABLE_AFTER_S = 60.0
_MAX_FAILURES_IN_A_ROW = 5
_STOP_GRACE_S = 15.0
_READY_STALE_S = 5.0  # a child's readiness older than this (it stopped answering) counts as not ready
_LABEL = "worker_process"


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    relay: threading.Thread | None = None  # its output to ours
    port_file: Path | None = None
    port: int | None = None
    started_at: float = 0.0  # monotonic
    down_since: float | None = None  # monotonic, while waiting for a restart
    restart_at: float | None = None
    failures: int = 0  # exits in a row without a stable run
    restarts: int = 0
    last_exit: int | None = None
    # The latest answers of its endpoints, and when they came.
    health: dict[str, Any] | None = None
    ready: dict[str, Any] | None = None
    answered_at: float | None = None  # /healthz
    ready_at: float | None = None  # /readyz

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class _Outcome:
    code: int | None = None
    reason: str = ""


class Supervisor:
    def __init__(self, settings: Settings, processes: int, config_file: Path | None = None,
                 python: str = sys.executable) -> None:
        self._settings = settings
        self._n = processes
        self._config_file = config_file.resolve() if config_file is not None else None
        self._python = python
        self._children = [_Child(i) for i in range(processes)]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._outcome = _Outcome()
        self._checked_at = time.monotonic()
        self._tmp = Path(tempfile.mkdtemp(prefix="streamguard-workers-"))
        self._metrics_pool = ThreadPoolExecutor(max_workers=min(8, processes), thread_name_prefix="metrics")
        self._check_pool = ThreadPoolExecutor(max_workers=min(8, processes), thread_name_prefix="check")
        self.registry = CollectorRegistry(auto_describe=True)
        self._running_gauge = Gauge("streamguard_worker_processes", "Worker processes running in this pod.",
                                    registry=self.registry)
        self._wanted_gauge = Gauge("streamguard_worker_processes_wanted", "Worker processes this pod runs "
                                   "(worker.processes).", registry=self.registry)
        self._restarts = Counter("streamguard_worker_process_restarts", "Worker processes restarted after "
                                 "exiting on their own.", registry=self.registry)
        self._wanted_gauge.set(processes)
        self.health = _PodHealth(self)

    # -- lifecycle ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Drain every child and exit (signal handlers call this)."""
        self._stop.set()
        self._wake.set()

    def run(self) -> int:
        w = self._settings.worker
        _whole_lines()
        server = HealthServer.from_settings(self.health, self.render_metrics, w).start()
        log.info("supervisor.started", processes=self._n, health_port=server.port, group=w.group_id)
        checker = threading.Thread(target=self._check_forever, name="supervisor-check", daemon=True)
        try:
            for child in self._children:
                self._start(child)
            checker.start()
            self._supervise()
        finally:
            self._stop.set()
            self._terminate_all()
            server.close()
            self._metrics_pool.shutdown(wait=False, cancel_futures=True)
            self._check_pool.shutdown(wait=False, cancel_futures=True)
            for child in self._children:
                if child.port_file is not None:
                    child.port_file.unlink(missing_ok=True)
            try:
                self._tmp.rmdir()
            except OSError:
                pass
        out = self._outcome
        codes = {c.index: c.last_exit for c in self._children}
        if out.code is None:
            out.code = 0 if all(code == 0 for code in codes.values()) else 1
        log.info("supervisor.stopped", exit_code=out.code, children=codes, reason=out.reason or "stopped")
        return out.code

    def _supervise(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for child in self._children:
                if child.proc is not None and child.proc.poll() is not None:
                    self._exited(child, now)
                    if self._stop.is_set():
                        return
                if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                    self._restarts.inc()
                    child.restarts += 1
                    self._start(child)
            with self._lock:
                self._running_gauge.set(sum(1 for c in self._children if c.running))
            self._wake.wait(0.2)
            self._wake.clear()

    def _start(self, child: _Child) -> None:
        child.port_file = self._tmp / f"child-{child.index}.port"
        child.port_file.unlink(missing_ok=True)
        argv = [self._python, "-m", "streamguard"]
        if self._config_file is not None:
            argv += ["--config", str(self._config_file)]
        argv += ["worker", "--processes", "1", "--parent-pid", str(os.getpid()),
                 "--child-index", str(child.index), "--health-port-file", str(child.port_file)]
        env = {
            **os.environ,
            # The pod's port is the supervisor's; each child listens on loopback, on a port of its own.
            "STREAMGUARD_WORKER__HEALTH_HOST": "127.0.0.1",
            "STREAMGUARD_WORKER__HEALTH_PORT": "0",
            "STREAMGUARD_WORKER__PROCESSES": "1",
        }
        with self._lock:
            # Its output comes through a pipe and goes out line by line: children writing to one stream
            # directly would split each other's lines (an unbuffered stream writes a line in pieces).
            child.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
            child.relay = threading.Thread(target=_relay, args=(child.proc.stdout,), name=f"relay-{child.index}",
                                           daemon=True)
            child.relay.start()
            child.port = None
            child.health = child.ready = None
            child.answered_at = child.ready_at = None
            child.started_at = time.monotonic()
            child.down_since = child.restart_at = None
        log.info("supervisor.child_started", index=child.index, pid=child.pid, restarts=child.restarts)

    def _exited(self, child: _Child, now: float) -> None:
        assert child.proc is not None
        code = child.proc.returncode
        ran_s = now - child.started_at
        with self._lock:
            pid = child.proc.pid
            child.last_exit = code
            child.proc = None
            child.port = None
            child.health = child.ready = None
            child.down_since = now
        kind = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit {code}"
        if code == KAFKA_UNREACHABLE_EXIT:
            log.error("supervisor.child_exited", index=child.index, pid=pid, status=kind, ran_s=round(ran_s, 1),
                      action="stop the pod: the broker is unreachable")
            self._give_up(KAFKA_UNREACHABLE_EXIT, f"child {child.index}: broker unreachable")
            return
        child.failures = 1 if ran_s >= _STABLE_AFTER_S else child.failures + 1
        if child.failures > _MAX_FAILURES_IN_A_ROW:
            log.error("supervisor.child_exited", index=child.index, pid=pid, status=kind, ran_s=round(ran_s, 1),
                      action="give up", failures_in_a_row=child.failures)
            self._give_up(1, f"child {child.index} failed {child.failures} times in a row")
            return
        delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (child.failures - 1))
        child.restart_at = now + delay
        log.error("supervisor.child_exited", index=child.index, pid=pid, status=kind, ran_s=round(ran_s, 1),
                  action="restart", restart_in_s=delay, failures_in_a_row=child.failures)

    def _give_up(self, code: int, reason: str) -> None:
        self._outcome.code = code
        self._outcome.reason = reason
        self._stop.set()

    def _terminate_all(self) -> None:
        """SIGTERM every running child, wait for their drain, SIGKILL what is left."""
        running = [c for c in self._children if c.running]
        log.info("supervisor.stopping", children=[c.pid for c in running])
        for child in running:
            try:
                child.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self._settings.worker.drain_timeout_s + _STOP_GRACE_S
        for child in running:
            proc = child.proc
            assert proc is not None
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("supervisor.child_killed", index=child.index, pid=proc.pid, reason="did not stop in time")
                proc.kill()
                proc.wait()
            child.last_exit = proc.returncode
            with self._lock:
                child.proc = None
        for child in running:
            if child.relay is not None:
                child.relay.join(timeout=5)  # its last lines (the drain's) before ours
        self._running_gauge.set(0)

    # -- health ---------------------------------------------------------------------------------------

    def _check_forever(self) -> None:
        while not self._stop.is_set():
            # At once: a child that does not answer must not delay the others' checks.
            list(self._check_pool.map(self._check, self._children))
            self._checked_at = time.monotonic()
            self._stop.wait(_CHECK_INTERVAL_S)

    def _check(self, child: _Child) -> None:
        with self._lock:
            proc, port, port_file = child.proc, child.port, child.port_file
        if proc is None or proc.poll() is not None:
            return
        if port is None:
            port = _read_port(port_file)
            if port is None:
                return
        health = _get_json(port, "/healthz")
        ready = _get_json(port, "/readyz")
        now = time.monotonic()
        with self._lock:
            if child.proc is not proc:
                return  # it exited and was replaced while we asked
            child.port = port
            if health is not None:
                child.health = health
                child.answered_at = now
            if ready is not None:
                child.ready = ready
                child.ready_at = now

    def liveness(self) -> dict[str, Any]:
        timeout = self._settings.worker.liveness_timeout_s
        now = time.monotonic()
        children = []
        with self._lock:
            for child in self._children:
                children.append(self._child_liveness(child, now, timeout))
        checker_age = now - self._checked_at
        alive = all(c["alive"] for c in children) and checker_age < timeout
        return {"alive": alive, "processes": self._n, "children": children}

    @staticmethod
    def _child_liveness(child: _Child, now: float, timeout: float) -> dict[str, Any]:
        out: dict[str, Any] = {"index": child.index, "pid": child.pid, "restarts": child.restarts}
        if child.proc is None:
            # Down, waiting for its restart: alive while that is recent.
            down = now - (child.down_since or now)
            out.update(state="restarting", alive=down < timeout, seconds_down=round(down, 3),
                       last_exit=child.last_exit)
            return out
        if child.health is None:
            age = now - child.started_at
            out.update(state="starting", alive=age < timeout, seconds_since_start=round(age, 3))
            return out
        silent = now - (child.answered_at or now)
        out.update(state="running", alive=bool(child.health.get("alive")) and silent < timeout,
                   seconds_since_poll=child.health.get("seconds_since_poll"),
                   seconds_since_answer=round(silent, 3))
        return out

    def readiness(self) -> dict[str, Any]:
        now = time.monotonic()
        children = []
        with self._lock:
            for child in self._children:
                fresh = child.ready_at is not None and now - child.ready_at < _READY_STALE_S
                body = dict(child.ready or {})
                body["ready"] = bool(child.proc is not None and fresh and body.get("ready"))
                children.append({"index": child.index, "pid": child.pid, **body})
        stopping = self._stop.is_set()
        return {
            "ready": not stopping and any(c["ready"] for c in children),
            "processes": self._n,
            "children_ready": sum(1 for c in children if c["ready"]),
            "partitions_assigned": sum(int(c.get("partitions_assigned") or 0) for c in children),
            "stopping": stopping,
            "children": children,
        }

    def render_metrics(self) -> bytes:
        with self._lock:
            targets = [(c.index, c.port) for c in self._children if c.proc is not None and c.port is not None]
        texts = list(self._metrics_pool.map(lambda t: (t[0], _get_text(t[1], "/metrics")), targets))
        merged = _merge_metrics([(index, text) for index, text in texts if text is not None])
        return generate_latest(self.registry) + merged

    @property
    def children(self) -> Sequence[_Child]:
        return self._children


class _PodHealth(HealthState):
    """The health server's view of the pod: the supervisor's aggregate of its children."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__(liveness_timeout_s=supervisor._settings.worker.liveness_timeout_s,
                         readiness=supervisor.readiness)
        self._supervisor = supervisor

    def liveness(self) -> dict[str, Any]:
        return self._supervisor.liveness()


_OUTPUT_LOCK = threading.Lock()


def _relay(stream: Any) -> None:
    """A child's output to this process's stderr, whole lines at a time."""
    with stream:
        for line in iter(stream.readline, b""):
            text = line.decode("utf-8", "replace")
            with _OUTPUT_LOCK:
                sys.stderr.write(text if text.endswith("\n") else text + "\n")
                sys.stderr.flush()


class _LinePrintLogger(structlog.PrintLogger):
    """structlog's PrintLogger, writing each line in one piece under the relay's lock."""

    def msg(self, message: str) -> None:
        with _OUTPUT_LOCK:
            self._file.write(message + "\n")
            self._file.flush()

    log = debug = info = warn = warning = fatal = failure = err = error = critical = exception = msg


def _whole_lines() -> None:
    """The supervisor's own log lines, as the children's, go out whole."""
    structlog.configure(logger_factory=lambda *args: _LinePrintLogger(sys.stderr))


def _read_port(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _get_text(port: int, path: str, timeout: float = _METRICS_TIMEOUT_S) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.read().decode()
    except urllib.error.HTTPError as exc:  # 503 still carries the body
        try:
            return exc.read().decode()
        except OSError:
            return None
    except (OSError, ValueError):
        return None


def _get_json(port: int, path: str) -> dict[str, Any] | None:
    text = _get_text(port, path, timeout=_CHECK_TIMEOUT_S)
    if text is None:
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _merge_metrics(texts: Iterable[tuple[int, str]]) -> bytes:
    """The children's Prometheus expositions as one, each sample labelled with its child's index."""
    families: dict[str, Metric] = {}
    for index, text in texts:
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, _LABEL: str(index)}, sample.value,
                                  sample.timestamp, sample.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
