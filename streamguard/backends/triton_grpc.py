"""The Triton backend: a detector's model served by Triton, called over gRPC with the asyncio client.

One batch from the worker becomes several small requests sent at once (``request_batch_size`` images
each, at most ``max_requests_in_flight`` outstanding), so Triton's dynamic batcher can merge them with
other workers' requests into full batches. The detector runner calls `predict` from its own thread; the
requests run on an event loop this backend owns.

Failures are sorted in two kinds. The server being away (connection refused, UNAVAILABLE, model not
loaded, queue full, deadline exceeded) is retried with exponential backoff and jitter within
``retry_budget_s``, then raised as `BackendUnavailable`: the worker holds the records and pauses
instead of publishing error scores. Anything else (bad input, a model that raises) is the detector's
error and becomes an error score. A breaker per model stops the retrying once an outage is known;
`ready()` asks Triton itself, so recovery is noticed without sending images.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog

from streamguard.config import TritonSettings
from streamguard.detectors.breaker import CircuitBreaker
from streamguard.detectors.spec import BackendUnavailable, DetectorInput

log = structlog.get_logger(__name__)

INPUT = "PIXELS"
OUTPUT = "LOGITS"
VERSION_PARAMETER = "streamguard_version"

# gRPC status codes that mean "the server, not this request": worth retrying, and an outage if it lasts.
_UNAVAILABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
# Triton answers these for a model that is loading, unloaded or queue-full, under various codes.
_UNAVAILABLE_MESSAGES = ("is not found", "is not ready", "unavailable", "exceeds maximum queue size",
                         "request timeout expired", "failed to connect", "connection refused", "socket closed")

T = TypeVar("T")


class VersionMismatch(BackendUnavailable):
    """Triton serves other weights than the worker's detector spec describes: its logits would meet the
    wrong calibration and dedupe keys would lie. Treated as an outage, so nothing is judged by it."""


def _status(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    text = status() if callable(status) else ""
    return str(text or "").rsplit(".", 1)[-1]


def is_unavailable(exc: BaseException) -> bool:
    """Whether a tritonclient error says the server is away rather than that the request is wrong."""
    if isinstance(exc, BackendUnavailable | ConnectionError | asyncio.TimeoutError):
        return True
    if _status(exc) in _UNAVAILABLE_CODES:
        return True
    message = _describe(exc).lower()
    return any(fragment in message for fragment in _UNAVAILABLE_MESSAGES)


# Round robin over every address the target resolves to: a dns:/// name of a headless Service (one address
# per Triton pod) or a list of addresses. gRPC's default, pick_first, would send everything to one server.
# Addresses that do not answer are skipped until they reconnect. gRPC resolves the name again when a
# connection drops (a pod went away), not on a timer: a pod added later is used from the next re-resolution.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_args() -> list[tuple[str, Any]]:
    """tritonclient's defaults, round-robin balancing, and a short reconnect backoff: gRPC's default grows to
    two minutes, which would keep a worker paused long after Triton came back."""
    # Keepalive as tritonclient sets it: Triton answers more frequent pings with GOAWAY "too_many_pings".
    return [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.keepalive_time_ms", 2**31 - 1),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 2),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


class TritonBackend:
    """`DetectorBackend` for one Triton model. ``expected_version`` is the detector spec's version, which
    the model's ``streamguard_version`` parameter must equal.

    A model with several outputs (the shared-trunk ensemble: one logit per detector) is called through
    `infer`, with each detector's version in a parameter of its own (`expect`)."""

    def __init__(self, model: str, settings: TritonSettings, expected_version: str | None = None,
                 detector: str | None = None, outputs: Sequence[str] = (OUTPUT,)) -> None:
        self.model = model
        self.detector = detector or model
        self._settings = settings
        self._outputs = tuple(outputs)
        self._expected: dict[str, str] = {} if expected_version is None else {VERSION_PARAMETER: expected_version}
        self._checked = False
        self._served_version: str | None = None
        self._breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self._ready_at = -1.0
        self._ready = False
        self._ready_lock = threading.Lock()
        self._rng = random.Random()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"triton-{model}", daemon=True)
        self._thread.start()
        self._client = self._run(self._connect(), timeout=10)
        self._slots = asyncio.Semaphore(settings.max_requests_in_flight)
        log.info("triton.backend_created", model=model, url=settings.url, tls=settings.ssl,
                 mutual_tls=settings.certificate_chain is not None)

    # -- DetectorBackend ------------------------------------------------------------------------------

    def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
        if not batch:
            return []
        if any(item.pixels is None for item in batch):
            raise ValueError("the Triton backend needs pixels; declare an InputContract on the detector")
        pixels = np.stack([item.pixels for item in batch])  # type: ignore[misc]
        return [float(v) for v in self.infer(pixels)[self._outputs[0]]]

    def infer(self, pixels: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One value per image of each of ``outputs`` (default: all of this backend's), for (N, 3, H, W)
        pixels; raises `BackendUnavailable` when Triton stays away past the retry budget."""
        wanted = tuple(outputs) if outputs is not None else self._outputs
        if not self._breaker.allow():
            raise BackendUnavailable(f"triton model {self.model!r}: circuit open after repeated unavailability")
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        budget = self._settings.retry_budget_s
        # Retries start until the budget is spent; the last one may then take a whole request timeout.
        wait = budget + self._settings.request_timeout_s + 5
        try:
            if not self._checked:
                self._run(self._check_version(time.monotonic() + budget), timeout=wait)
            values = self._run(self._infer_all(pixels, wanted, time.monotonic() + budget), timeout=wait)
        except BackendUnavailable:
            self._breaker.record(False)
            self._mark_unready()
            raise
        self._breaker.record(True)
        return values

    def expect(self, parameter: str, version: str) -> None:
        """Require the model's config parameter ``parameter`` to be ``version`` (checked before the next call)."""
        self._expected[parameter] = version
        self._checked = False

    def ready(self) -> bool:
        """Triton says the model is ready and serves the expected version; cached ``ready_cache_s``."""
        with self._ready_lock:
            now = time.monotonic()
            if now - self._ready_at < self._settings.ready_cache_s:
                return self._ready
            try:
                ok = self._run(self._probe(), timeout=5)
            except Exception as exc:  # noqa: BLE001 - a probe that fails is a "no", whatever the reason
                log.debug("triton.probe_failed", model=self.model, error=f"{type(exc).__name__}: {exc}")
                ok = False
            self._ready, self._ready_at = ok, now
            if ok:
                # Triton is back: let the next call through at once instead of waiting out the breaker.
                self._breaker.record(True)
            return ok

    @property
    def served_version(self) -> str | None:
        return self._served_version

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close(), timeout=5)
        except Exception:  # noqa: BLE001 - closing a dead channel may fail; nothing to keep
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    # -- on the event loop ----------------------------------------------------------------------------

    async def _connect(self) -> Any:
        from tritonclient.grpc.aio import InferenceServerClient

        settings = self._settings
        # tritonclient reads the PEM files here, once: a rotated certificate is used by the next backend.
        return InferenceServerClient(
            settings.grpc_target(),
            ssl=settings.ssl,
            root_certificates=_path(settings.root_certificates),
            private_key=_path(settings.private_key),
            certificate_chain=_path(settings.certificate_chain),
            channel_args=channel_args(),
        )

    async def _probe(self) -> bool:
        timeout = min(2.0, self._settings.request_timeout_s)
        if not await self._client.is_model_ready(self.model, client_timeout=timeout):
            return False
        # A restarted server may serve other weights: read the version again on every recovery.
        self._checked = False
        await self._check_version(time.monotonic() + timeout)
        return True

    async def _check_version(self, deadline: float) -> None:
        config = await self._retrying(lambda: self._client.get_model_config(
            self.model, as_json=True, client_timeout=min(5.0, self._settings.request_timeout_s)), deadline)
        parameters = config.get("config", {}).get("parameters", {})

        def served(key: str) -> str:
            return str(parameters.get(key, {}).get("string_value", ""))

        for key, expected in self._expected.items():
            if served(key) != expected:
                log.error("triton.version_mismatch", model=self.model, parameter=key, served=served(key),
                          expected=expected)
                raise VersionMismatch(
                    f"triton model {self.model!r} serves version {served(key) or '(none)'!r}"
                    f"{'' if key == VERSION_PARAMETER else f' in {key}'}, the worker expects {expected!r}: "
                    "rebuild the repository from the same weights"
                )
        self._served_version = served(VERSION_PARAMETER) or None
        self._checked = True

    async def _infer_all(self, pixels: np.ndarray, outputs: Sequence[str], deadline: float) -> dict[str, np.ndarray]:
        size = self._settings.request_batch_size
        parts = [pixels[lo : lo + size] for lo in range(0, len(pixels), size)]
        results = await asyncio.gather(*(self._infer_one(part, outputs, deadline) for part in parts))
        return {name: np.concatenate([part[name] for part in results]) for name in outputs}

    async def _infer_one(self, pixels: np.ndarray, names: Sequence[str], deadline: float) -> dict[str, np.ndarray]:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        tensor = InferInput(INPUT, list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        outputs = [InferRequestedOutput(name) for name in names]

        async def call() -> dict[str, np.ndarray]:
            # The full request timeout every attempt: the retry budget bounds waiting for an absent server,
            # not how long a present one may compute.
            timeout = self._settings.request_timeout_s
            async with self._slots:
                # The server-side timeout (microseconds) lets Triton's queue policy drop a request the
                # client has already given up on, instead of computing it for nobody.
                result = await self._client.infer(self.model, [tensor], outputs=outputs, client_timeout=timeout,
                                                  timeout=int(timeout * 1_000_000))
            values = {}
            for name in names:
                logits = result.as_numpy(name)
                if logits is None or logits.shape[0] != pixels.shape[0]:
                    raise ValueError(f"triton model {self.model!r} returned {None if logits is None else logits.shape} "
                                     f"of {name} for {pixels.shape[0]} images")
                values[name] = logits.reshape(pixels.shape[0], -1)[:, 0]
            return values

        return await self._retrying(call, deadline)

    async def _retrying(self, call: Any, deadline: float) -> Any:
        backoff = self._settings.backoff_initial_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()
            except Exception as exc:
                if not is_unavailable(exc) or isinstance(exc, VersionMismatch):
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackendUnavailable(
                        f"triton model {self.model!r} unavailable after {attempt} attempts: {_describe(exc)}"
                    ) from exc
                log.debug("triton.retry", model=self.model, attempt=attempt, error=_describe(exc))
                # Full jitter: many workers losing Triton together must not come back in lockstep.
                await asyncio.sleep(min(remaining, self._rng.uniform(0, backoff)))
                backoff = min(backoff * 2, self._settings.backoff_max_s)

    # -- plumbing -------------------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=timeout)
        except TimeoutError as exc:
            future.cancel()
            raise BackendUnavailable(f"triton model {self.model!r}: no answer within {timeout:g}s") from exc

    def _mark_unready(self) -> None:
        with self._ready_lock:
            self._ready, self._ready_at = False, time.monotonic()


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)  # type: ignore[attr-defined]
    return f"{status + ': ' if status else ''}{message}"[:300]
