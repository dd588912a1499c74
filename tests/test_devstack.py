"""`streamguard dev up|down` as a developer runs it: real processes, real ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
import tritonclient.grpc as grpcclient
from kafka import KafkaConsumer

from streamguard.devstack import TritonService, load_state
from streamguard.worker.health import HealthServer, HealthState


def _sg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamguard", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_dev_up_prints_exports_and_dev_down_stops_everything(tmp_path: Path) -> None:
    # Settings as a developer's: the CLIP detectors the suite denies elsewhere are what Triton serves here.
    env = {k: v for k, v in os.environ.items() if k != "STREAMGUARD_PLUGINS__DENY"}
    up = _sg("dev", "up", "--workdir", str(tmp_path), "--partitions", "3", env=env)
    assert up.returncode == 0, up.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
    services = load_state(tmp_path)
    try:
        bootstrap = exports["STREAMGUARD_KAFKA__BOOTSTRAP_SERVERS"]
        consumer = KafkaConsumer(bootstrap_servers=bootstrap)
        partitions = {t: len(consumer.partitions_for_topic(t) or ()) for t in ("images", "verdicts", "images.dlq")}
        consumer.close()
        assert partitions == {"images": 3, "verdicts": 3, "images.dlq": 1}
        assert redis.Redis.from_url(exports["STREAMGUARD_REDIS__URL"]).ping()
        # Triton comes back from the state file with its ports.
        triton = next(s for s in services if s.name == "triton")
        assert isinstance(triton, TritonService) and triton.grpc_address == exports["STREAMGUARD_TRITON__URL"]
        client = grpcclient.InferenceServerClient(triton.grpc_address)
        try:
            index = {m["name"]: m.get("state") for m in client.get_model_repository_index(as_json=True)["models"]}
        finally:
            client.close()
        # The CLIP detectors the worker loads by default (univfd and pin-clip, not the opt-in mpft) on the shared
        # trunk, which the worker is told to call; no whole models.
        from streamguard.triton.build import default_models
        from streamguard.triton.shared_trunk import ENSEMBLE_MODEL, models_of

        assert set(default_models()) == {"univfd", "pin-clip", "mpft"}
        assert index == dict.fromkeys(models_of(["univfd", "pin-clip"]), "READY")
        assert exports["STREAMGUARD_TRITON__TRUNK_MODEL"] == ENSEMBLE_MODEL
        # A second `up` reuses the running services.
        again = _sg("dev", "up", "--workdir", str(tmp_path), env=env)
        assert again.stdout == up.stdout
        settings = json.loads(_sg("config", "show", env={**os.environ, **exports}).stdout)
        assert settings["kafka"]["bootstrap_servers"] == bootstrap
    finally:
        down = _sg("dev", "down", "--workdir", str(tmp_path))
    assert down.returncode == 0 and "stopped 3 services" in down.stdout
    assert all(not s.alive() for s in services)
    assert load_state(tmp_path) == []


def test_health_endpoints() -> None:
    state = HealthState(liveness_timeout_s=0.2)
    state.readiness = lambda: {"ready": False, "partitions_assigned": 0}
    server = HealthServer(state, lambda: b"# metrics\n", "127.0.0.1", 0).start()

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    try:
        state.progress()
        assert get("/healthz")[0] == 200
        status, body = get("/readyz")
        assert status == 503 and json.loads(body)["partitions_assigned"] == 0
        assert get("/metrics") == (200, b"# metrics\n")
        assert get("/nope")[0] == 404
        time.sleep(0.3)  # the poll loop stalls
        status, body = get("/healthz")
        assert status == 503 and json.loads(body)["alive"] is False
    finally:
        server.close()


def test_ports_drawn_together_are_all_different(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may hand a just-released port out again; `free_ports` draws again on a repeat, and keeps
    every socket bound until all are chosen, so a real draw of several is several ports."""
    import socket

    import streamguard.devstack as devstack

    given = iter([5000, 5000, 5001, 5000, 5002])
    opened: list[FakeSocket] = []

    class FakeSocket:
        def __init__(self, family: int = socket.AF_INET) -> None:
            self.port, self.closed = next(given), False
            opened.append(self)

        def bind(self, address: tuple[str, int]) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return "127.0.0.1", self.port

        def __enter__(self) -> FakeSocket:
            return self

        def __exit__(self, *exc: object) -> None:
            self.closed = True

    with monkeypatch.context() as patched:
        patched.setattr(devstack.socket, "socket", FakeSocket)
        assert devstack.free_ports(["127.0.0.1", "127.0.0.1", "::1"]) == [5000, 5001, 5002]
    assert len(opened) == 5 and all(s.closed for s in opened)
    real = devstack.free_ports(["127.0.0.1"] * 4)
    assert len(set(real)) == 4
