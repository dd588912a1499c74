"""The worker's health server against real sockets on loopback: what idle and slow clients may cost it."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from streamguard.config import WorkerSettings
from streamguard.worker.health import HealthServer, HealthState

HOST = "127.0.0.1"


@contextlib.contextmanager
def running(host: str = HOST, **limits: Any) -> Iterator[HealthServer]:
    state = HealthState(liveness_timeout_s=60)
    state.readiness = lambda: {"ready": True}
    server = HealthServer(state, lambda: b"# metrics\n", host, 0, **limits).start()
    try:
        yield server
    finally:
        server.close()


def get(port: int, path: str = "/healthz", host: str = HOST) -> tuple[int, dict[str, Any]]:
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get_admitted(port: int, within_s: float) -> tuple[int, dict[str, Any]]:
    """`get`, retried while the server refuses the connection (no slot free), for up to ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return get(port)
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, f"no connection slot came free within {within_s:g}s"
            time.sleep(0.02)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=5)
    return sock


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``within_s``."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_cost_no_threads_and_probes_still_answer() -> None:
    with running() as server:
        time.sleep(0.1)
        before = threading.active_count()
        idle = [connect(server.port) for _ in range(100)]
        try:
            time.sleep(0.3)
            # A thread per connection would add 100 here.
            assert threading.active_count() <= before + 4
            start = time.monotonic()
            assert get(server.port) == (200, {"alive": True, "seconds_since_poll": pytest.approx(0, abs=60)})
            assert get(server.port, "/readyz")[0] == 200
            assert time.monotonic() - start < 1.0
            assert threading.active_count() <= before + 4
        finally:
            for sock in idle:
                sock.close()


def test_idle_connection_closed_after_the_timeout() -> None:
    with running(connection_timeout_s=0.3) as server:
        start = time.monotonic()
        with connect(server.port) as sock:
            assert closed_by_server(sock, within_s=5)
        assert 0.25 < time.monotonic() - start < 2


def test_half_sent_request_closed_after_the_timeout() -> None:
    with running(connection_timeout_s=0.3) as server:
        with connect(server.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the headers never end
            start = time.monotonic()
            assert closed_by_server(sock, within_s=5)
            assert time.monotonic() - start < 2
        assert get(server.port)[0] == 200  # the serving thread is free again


def test_connections_over_the_limit_are_closed_at_once() -> None:
    with running(max_connections=4, connection_timeout_s=30) as server:
        idle = [connect(server.port) for _ in range(4)]
        try:
            with connect(server.port) as extra:
                assert closed_by_server(extra, within_s=1)
            assert not closed_by_server(idle[0], within_s=0.2)  # the ones admitted are kept
        finally:
            for sock in idle:
                sock.close()
        # Closed by their clients, the slots come back.
        assert get_admitted(server.port, within_s=5)[0] == 200


def test_many_sequential_probes_release_their_slots() -> None:
    """20 probes one after another through 2 slots: a slot that leaked would refuse every probe after the
    second. The client reads a response before the serving thread returns its slot, so on a busy machine
    the next probe can come a moment too early and is refused; it then gets in on a retry."""
    with running(max_connections=2) as server:
        for _ in range(20):
            assert get_admitted(server.port, within_s=2)[0] == 200


def test_binds_the_configured_host() -> None:
    with running("127.0.0.3") as server:
        assert get(server.port, host="127.0.0.3")[0] == 200
        with pytest.raises(OSError):
            socket.create_connection((HOST, server.port), timeout=1).close()


def test_binds_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server_cm = running("::1")
        server = server_cm.__enter__()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert get(server.port, host="::1")[0] == 200
    finally:
        server_cm.__exit__(None, None, None)


def test_settings_defaults_and_from_settings() -> None:
    settings = WorkerSettings()
    assert settings.health_host == "0.0.0.0"  # probes come from outside the pod
    assert settings.health_connection_timeout_s == 5.0 and settings.health_max_connections == 256
    local = WorkerSettings(health_host=HOST, health_port=0, health_max_connections=1, health_connection_timeout_s=0.2)
    server = HealthServer.from_settings(HealthState(liveness_timeout_s=60), lambda: b"", local).start()
    try:
        with connect(server.port) as first, connect(server.port) as second:
            assert closed_by_server(second, within_s=1)  # over the one allowed
            assert closed_by_server(first, within_s=2)  # and the idle one times out
    finally:
        server.close()
