"""HTTP health and metrics: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``.

Liveness only asks whether the poll loop is making progress: a worker waiting out a Triton or Redis
outage is alive, and restarting it would only cause a rebalance storm. Readiness reports whether it can
do useful work (partitions assigned, a detector ready) and shows the state of each dependency.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST


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
    def __init__(self, state: HealthState, metrics: Callable[[], bytes], host: str, port: int) -> None:
        handler = _handler(state, metrics)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(state: HealthState, metrics: Callable[[], bytes]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
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
