"""The check API over HTTP: ``POST /v1/check``, stdlib `http.server` on a bounded pool of threads.

The standard library is enough here and keeps the lean worker install free of an ASGI stack: the work is
a blocking wait on the pipeline, one thread per request in flight, and the pool bounds those threads
(``serve.threads``) as a semaphore bounds connections (``serve.max_connections``, over it: 503 at once).
Every connection answers one request and closes, so an idle keep-alive connection never holds a thread.

A request is refused as early as its headers allow: no key (401), no tokens (429), a content type that is
not an image or JSON (415), a Content-Length over the cap (413), all before a byte of the body is read;
``Expect: 100-continue`` is honoured, so a client that asks is told before it sends the body.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from pydantic import ValidationError

from streamguard.config import ServeSettings
from streamguard.schemas import ImageEvent, Verdict
from streamguard.serve import answers
from streamguard.serve.answers import Answer
from streamguard.serve.auth import ApiKey, KeyRing
from streamguard.serve.batcher import MicroBatcher, NoOutcome, Overloaded, ReviewUnavailable
from streamguard.serve.checks import UriCheck, as_record, upload_event, uri_event
from streamguard.serve.metrics import ServeMetrics
from streamguard.serve.ratelimit import Limiter, retry_after_header

log = structlog.get_logger(__name__)

CHECK_PATH = "/v1/check"
TENANT_HEADER = "X-Streamguard-Tenant"
EVENT_ID_HEADER = "X-Streamguard-Event-Id"
_READ_CHUNK = 64 * 1024
# After refusing a body it did not read, the server reads (and drops) a little of it before closing:
# closing with unread input sends a TCP reset, which can destroy the answer before the client reads it.
_LINGER_BYTES = 1024 * 1024
_LINGER_S = 1.0
_BUSY_BODY = b'{"error": "Overloaded", "reason": "too many connections"}\n'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


@dataclass
class CheckApi:
    """What a request handler needs: limits, keys, the batcher and the metrics."""

    settings: ServeSettings
    max_image_bytes: int
    keys: KeyRing | None  # None: serve.auth is off
    limiter: Limiter
    batcher: MicroBatcher
    metrics: ServeMetrics


class _Refusal(Exception):
    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.body.get("reason"))
        self.answer = answer


def _refuse(status: int, error_type: str, reason: str, retry_after_s: float | None = None) -> _Refusal:
    answer = answers.error(status, error_type, reason)
    if retry_after_s is not None:
        answer = Answer(answer.status, answer.body, retry_after_s)
    return _Refusal(answer)


def handler_class(api: CheckApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 for Expect: 100-continue; every answer still says Connection: close (see the module).
        protocol_version = "HTTP/1.1"
        timeout = api.settings.read_timeout_s
        server_version, sys_version = "streamguard", ""  # not the Python version, to whoever asks
        _expects_continue = False
        _unread_body = False

        def handle_expect_100(self) -> bool:
            # Decide after the checks in do_POST: a refused client then never sends the body at all.
            self._expects_continue = True
            return True

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            t0 = time.perf_counter()
            # Until _read takes it, whatever body the client sends is unread (see finish).
            self._unread_body = (self.headers.get("Content-Length", "0").strip() != "0"
                                 or self.headers.get("Transfer-Encoding") is not None)
            try:
                answer, payload = self._check(), None
                if isinstance(answer, Verdict):
                    answer, payload = Answer(200, {}), answer.model_dump_json().encode()
            except _Refusal as refusal:
                answer, payload = refusal.answer, None
            except Exception:  # noqa: BLE001 - one request's bug must not end the serving thread
                log.exception("serve.request_failed")
                answer, payload = answers.error(500, "InternalError", "unexpected error; see the server's log"), None
            self._answer(answer, payload)
            api.metrics.requests.labels(str(answer.status)).inc()
            api.metrics.latency.observe(time.perf_counter() - t0)

        def do_GET(self) -> None:  # noqa: N802
            if urlsplit(self.path).path == CHECK_PATH:
                self._answer(answers.error(405, "MethodNotAllowed", f"use POST {CHECK_PATH}"), None,
                             extra={"Allow": "POST"})
            else:
                self._answer(answers.error(404, "NotFound", f"the API is POST {CHECK_PATH}"), None)

        # -- the check ------------------------------------------------------------------------------------

        def _check(self) -> Verdict | Answer:
            url = urlsplit(self.path)
            if url.path != CHECK_PATH:
                raise _refuse(404, "NotFound", f"the API is POST {CHECK_PATH}")
            key = self._authenticate()
            self._limit(key)
            kind = self._kind()
            length = self._length(api.settings.max_json_bytes if kind == "json" else api.max_image_bytes)
            query = {name: values[-1] for name, values in parse_qs(url.query).items()}
            event = self._event(kind, self._read(length), key, query)
            return self._judge(event)

        def _authenticate(self) -> ApiKey | None:
            if api.keys is None:
                return None
            presented = self.headers.get("X-API-Key")
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            if presented is None and scheme.lower() == "bearer":
                presented = token.strip()
            key = api.keys.find(presented) if presented else None
            if key is None:
                raise _refuse(401, "Unauthorized", "a valid API key is required (Authorization: Bearer KEY)")
            return key

        def _limit(self, key: ApiKey | None) -> None:
            s = api.settings
            if key is None:  # auth off: each client address has its own bucket
                name, rate, burst = f"addr:{self.client_address[0]}", s.rate_per_s, s.burst
            else:
                name, rate, burst = f"key:{key.name}", key.rate_per_s or s.rate_per_s, key.burst or s.burst
            wait_s = api.limiter.take(name, rate, burst)
            if wait_s > 0:
                raise _refuse(429, "RateLimited", f"over {rate:g} requests/s (burst {burst})", retry_after_s=wait_s)

        def _kind(self) -> str:
            content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if content_type == "application/json":
                return "json"
            if content_type.startswith("image/") or content_type == "application/octet-stream":
                return "image"
            raise _refuse(415, "UnsupportedMediaType",
                          f"Content-Type {content_type or '(none)'!r}: send image/* bytes or application/json")

        def _length(self, cap: int) -> int:
            if self.headers.get("Transfer-Encoding"):
                raise _refuse(411, "LengthRequired", "send a Content-Length, not a chunked body")
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise _refuse(411, "LengthRequired", "a Content-Length is required")
            try:
                length = int(raw)
            except ValueError:
                raise _refuse(400, "BadRequest", "Content-Length is not a number") from None
            if length < 0:
                raise _refuse(400, "BadRequest", "Content-Length is negative")
            if length > cap:
                raise _refuse(413, "TooLarge", f"body of {length} bytes exceeds the limit of {cap}")
            return length

        def _read(self, length: int) -> bytes:
            if self._expects_continue:
                self.send_response_only(100)
                self.end_headers()
            deadline = time.monotonic() + api.settings.body_timeout_s
            chunks, got = [], 0
            while got < length:
                if time.monotonic() > deadline:
                    raise _refuse(408, "RequestTimeout", f"the body took over {api.settings.body_timeout_s:g} s")
                try:
                    chunk = self.rfile.read1(min(_READ_CHUNK, length - got))
                except TimeoutError:
                    raise _refuse(408, "RequestTimeout", "the body stopped arriving") from None
                if not chunk:
                    raise _refuse(400, "BadRequest", f"the body ended after {got} of {length} bytes")
                chunks.append(chunk)
                got += len(chunk)
            self._unread_body = False
            return b"".join(chunks)

        def _event(self, kind: str, body: bytes, key: ApiKey | None, query: dict[str, str]) -> ImageEvent:
            try:
                if kind == "json":
                    check = UriCheck.model_validate_json(body)
                    tenant = self._tenant(check.tenant or self.headers.get(TENANT_HEADER) or query.get("tenant"), key)
                    return uri_event(check, tenant)
                tenant = self._tenant(self.headers.get(TENANT_HEADER) or query.get("tenant"), key)
                event_id = self.headers.get(EVENT_ID_HEADER) or query.get("event_id")
                return upload_event(body, self.headers.get("Content-Type"), tenant, event_id)
            except ValidationError as exc:
                raise _refuse(422, "SchemaError", _reasons(exc)) from None

        def _tenant(self, asked: str | None, key: ApiKey | None) -> str | None:
            bound = key.tenant if key is not None else None
            if bound is not None and asked not in (None, bound):
                raise _refuse(403, "Forbidden", f"this key checks for tenant {bound!r} only")
            return asked or bound

        def _judge(self, event: ImageEvent) -> Verdict | Answer:
            value, headers, record_key = as_record(event)
            try:
                future = api.batcher.submit(value, headers, record_key)
            except Overloaded as exc:
                raise _refuse(503, "Overloaded", str(exc), retry_after_s=1) from None
            try:
                outcome = future.result(timeout=api.settings.request_timeout_s)
            except FutureTimeout:
                if future.cancel():
                    raise _refuse(504, "Timeout", f"no verdict within {api.settings.request_timeout_s:g} s") from None
                outcome = future.result()  # it arrived as we gave up
            except CancelledError:
                raise _refuse(504, "Timeout", "cancelled") from None
            except Overloaded as exc:
                raise _refuse(503, "Stopping", str(exc), retry_after_s=1) from None
            except ReviewUnavailable as exc:
                raise _refuse(503, "ReviewUnavailable", f"the review queue did not take the request: {exc}",
                              retry_after_s=1) from None
            except NoOutcome as exc:
                log.error("serve.no_outcome", event_id=event.event_id, error=str(exc))
                raise _refuse(500, "InternalError", "the pipeline gave no outcome") from None
            if isinstance(outcome, Verdict):
                return outcome
            return answers.for_dead_letter(outcome)

        # -- answering ------------------------------------------------------------------------------------

        def _answer(self, answer: Answer, payload: bytes | None, extra: dict[str, str] | None = None) -> None:
            body = payload if payload is not None else json.dumps(answer.body).encode() + b"\n"
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            if answer.status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="streamguard"')
            if answer.retry_after_s is not None:
                self.send_header("Retry-After", retry_after_header(answer.retry_after_s))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            if answer.status >= 500:
                log.warning("serve.answer", status=answer.status, error=answer.body.get("error"),
                            reason=answer.body.get("reason"))

        def finish(self) -> None:
            super().finish()
            if self._unread_body:
                _linger(self.connection)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the answer is logged above
            return

    return Handler


def _reasons(exc: ValidationError) -> str:
    # Never the input itself: it may be megabytes, or something the client should not see echoed.
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors(include_input=False))


def _linger(conn: socket.socket) -> None:
    """Half-close, then drop what the client still sends for a moment, so it can read the answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(_LINGER_S)
        deadline, dropped = time.monotonic() + _LINGER_S, 0
        while dropped < _LINGER_BYTES and time.monotonic() < deadline:
            chunk = conn.recv(_READ_CHUNK)
            if not chunk:
                return
            dropped += len(chunk)
    except OSError:
        pass


class PooledHTTPServer(HTTPServer):
    """An HTTPServer whose requests run on a fixed pool, with a cap on the connections it holds."""

    # socketserver's default backlog of 5 drops connections arriving together; the cap is enforced on
    # accept instead, where the answer is immediate.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], threads: int,
                 max_connections: int, metrics: ServeMetrics) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="serve-http")
        self._metrics = metrics

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        # Runs on the accept thread: decide at once, never block it.
        if not self._slots.acquire(blocking=False):
            self._metrics.refused_connections.inc()
            _send_busy(request)
            self.shutdown_request(request)
            return
        try:
            self._pool.submit(self._serve, request, client_address)
        except RuntimeError:  # the pool is shut down: the server is closing
            self._slots.release()
            self.shutdown_request(request)

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one bad client must not end the serving thread
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client hanging up is not worth one.
        log.debug("serve.connection_error", client=str(client_address[0]), exc_info=True)

    def finish_requests(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the requests in flight to be answered."""
        waiter = threading.Thread(target=self._pool.shutdown, kwargs={"wait": True}, daemon=True)
        waiter.start()
        waiter.join(timeout=timeout_s)


def _send_busy(request: socket.socket) -> None:
    try:
        request.setblocking(False)
        request.send(_BUSY)
    except OSError:
        pass
