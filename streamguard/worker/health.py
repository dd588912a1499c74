"""HTTP health and metrics: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``.

Liveness only asks whether the poll loop is making progress: a worker waiting out a Triton or Redis
outage is alive, and restarting it would only cause a rebalance storm. Readiness reports whether it can
do useful work (partitions assigned, a detector ready) and shows the state of each dependency.

The server listens on ``worker.health_host`` (``0.0.0.0`` by default: Kubernetes probes and Prometheus
come from outside the pod; ``127.0.0.1`` keeps it local, an IPv6 literal such as ``::`` listens on IPv6)
and is bounded in what it costs whoever connects: a thread per connection let 367 idle connections pin
373 threads. Here an accepted connection waits for its first bytes in one selector, without a thread;
only a connection with a request to read is served, by a small fixed pool. Connections open at once are
capped (``worker.health_max_connections``: over it, a new one is closed at once), and each is closed
after ``worker.health_connection_timeout_s`` without a request, or of silence while its request is read.
"""

from __future__ import annotations

import json
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from streamguard.config import WorkerSettings

log = structlog.get_logger(__name__)

# Probes and scrapes answer in milliseconds; a few threads serve any sane number of them.
_SERVING_THREADS = 4
_DEFAULT_MAX_CONNECTIONS: int = WorkerSettings.model_fields["health_max_connections"].default
_DEFAULT_TIMEOUT_S: float = WorkerSettings.model_fields["health_connection_timeout_s"].default

Address = tuple[Any, ...]


@dataclass
class HealthState:
    liveness_timeout_s: float
    last_progress: float = field(default_factory=time.monotonic)
    readiness: Callable[[], dict[str, Any]] = lambda: {"ready": False}

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def liveness(self) -> dict[str, Any]:
        age = time.monotonic() - self.last_progress
        return {"alive": age < self.liveness_timeout_s, "seconds_since_poll": round(age, 3)}


class HealthServer:
    def __init__(
        self,
        state: HealthState,
        metrics: Callable[[], bytes],
        host: str,
        port: int,
        *,
        max_connections: int = _DEFAULT_MAX_CONNECTIONS,
        connection_timeout_s: float = _DEFAULT_TIMEOUT_S,
    ) -> None:
        handler = _handler(state, metrics, connection_timeout_s)
        self._server = _BoundedServer((host, port), handler, max_connections, connection_timeout_s)
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @classmethod
    def from_settings(cls, state: HealthState, metrics: Callable[[], bytes], settings: WorkerSettings) -> HealthServer:
        return cls(state, metrics, settings.health_host, settings.health_port,
                   max_connections=settings.health_max_connections,
                   connection_timeout_s=settings.health_connection_timeout_s)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._server.start()
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _BoundedServer(HTTPServer):
    """An HTTPServer whose connections cost a slot while open and a thread only while a request is read."""

    # socketserver's default backlog of 5 drops connections arriving together (clients retry after 1 s, 3 s,
    # ...); the limit is enforced on accept instead, where the answer is immediate.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int,
                 timeout_s: float) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self._pool = ThreadPoolExecutor(_SERVING_THREADS, thread_name_prefix="health-serve")
        self._idle = _IdleConnections(timeout_s, ready=self._dispatch, expired=self._release)

    def start(self) -> None:
        self._idle.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        # Runs on the accept thread: decide at once, never block it.
        if not self._slots.acquire(blocking=False):
            log.debug("health.connection_refused", client=str(client_address[0]), limit=self._max_connections)
            self.shutdown_request(request)
            return
        self._idle.add(request, client_address)

    def _dispatch(self, request: socket.socket, client_address: Address) -> None:
        try:
            self._pool.submit(self._serve, request, client_address)
        except RuntimeError:  # the pool is shut down: the server is closing
            self._release(request)

    def _serve(self, request: socket.socket, client_address: Address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one bad client must not end the serving thread
            self.handle_error(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: socket.socket) -> None:
        self.shutdown_request(request)
        self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client hanging up is not worth one.
        log.debug("health.connection_error", client=str(client_address[0]), exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self._idle.close()
        self._pool.shutdown(wait=False)


class _IdleConnections:
    """Accepted connections waiting for their first bytes: one selector and one thread for all of them.

    A readable connection goes to ``ready`` (a request, or the client closing); one silent past the
    timeout goes to ``expired``. Connections arrive from the accept thread through a queue and a wake-up
    socket, so only this thread ever touches the selector.
    """

    def __init__(self, timeout_s: float, ready: Callable[[socket.socket, Address], None],
                 expired: Callable[[socket.socket], None]) -> None:
        self._timeout_s = timeout_s
        self._ready = ready
        self._expired = expired
        self._incoming: queue.SimpleQueue[tuple[socket.socket, Address]] = queue.SimpleQueue()
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._deadlines: dict[socket.socket, float] = {}
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-idle", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, conn: socket.socket, address: Address) -> None:
        self._incoming.put((conn, address))
        self._wake()

    def close(self) -> None:
        self._closing.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the waiter is closed

    def _run(self) -> None:
        while not self._closing.is_set():
            for key, _ in self._selector.select(self._next_timeout()):
                if key.fileobj is self._wake_read:
                    self._admit()
                else:
                    conn = self._forget(key.fileobj)  # type: ignore[arg-type]
                    self._ready(conn, key.data)
            self._expire(time.monotonic())
        self._admit()
        self._expire(float("inf"))  # closing: every parked connection goes

    def _next_timeout(self) -> float | None:
        if not self._deadlines:
            return None
        return max(0.0, min(self._deadlines.values()) - time.monotonic())

    def _admit(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                conn, address = self._incoming.get_nowait()
            except queue.Empty:
                return
            self._selector.register(conn, selectors.EVENT_READ, data=address)
            self._deadlines[conn] = deadline

    def _forget(self, conn: socket.socket) -> socket.socket:
        self._selector.unregister(conn)
        del self._deadlines[conn]
        return conn

    def _expire(self, now: float) -> None:
        for conn in [c for c, deadline in self._deadlines.items() if deadline <= now]:
            self._expired(self._forget(conn))


def _handler(state: HealthState, metrics: Callable[[], bytes], timeout_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # StreamRequestHandler applies it to the socket: reading a request, or writing the answer, never
        # holds a serving thread longer than this per operation.
        timeout = timeout_s

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/healthz":
                body = state.liveness()
                self._json(200 if body["alive"] else 503, body)
            elif self.path == "/readyz":
                body = state.readiness()
                self._json(200 if body.get("ready") else 503, body)
            elif self.path == "/metrics":
                self._send(200, metrics(), CONTENT_TYPE_LATEST)
            else:
                self._json(404, {"error": "not found"})

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes are not news
            return

    return Handler
