"""Calls one detector in isolation: its own thread, its own timeout, its own failure accounting.

pluggy gives plugins no isolation, so each detector gets a runner. A call that raises, times out, returns
the wrong number of logits, or hits an open circuit breaker becomes a `DetectorScore` with ``error`` for
every image of the batch; other detectors and the verdict go on.

A timed-out call cannot be cancelled (Python threads cannot be killed); its thread finishes in the
background and, being the detector's only thread, delays that detector's next call. Repeated timeouts
therefore open the breaker, which is the point: a hung detector stops costing latency.

The one failure that is not scored is `BackendUnavailable` (the model's server is away): `collect` raises
`DetectorUnavailable` so the caller can hold the images until the backend is ready again. Whether a
detector runs in-process or on Triton is configuration (``detectors.backend``), chosen here at start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import structlog

from streamguard.config import DetectorSettings, TritonSettings
from streamguard.detectors.breaker import CircuitBreaker
from streamguard.detectors.spec import (
    BackendUnavailable,
    DetectorBackend,
    DetectorInput,
    DetectorSpec,
    LoadContext,
)
from streamguard.detectors.trunk import SharedTrunks
from streamguard.extras import require
from streamguard.intake import aggregate_logits
from streamguard.schemas import DetectorScore

log = structlog.get_logger(__name__)


@dataclass
class DetectorStats:
    calls: int = 0
    images: int = 0
    errors: int = 0
    timeouts: int = 0
    rejected_open: int = 0
    unavailable: int = 0


class DetectorUnavailable(Exception):
    """A detector's backend could not be reached: the images were not judged and must be retried."""

    def __init__(self, detector: str, reason: str) -> None:
        super().__init__(f"{detector}: {reason}")
        self.detector = detector
        self.reason = reason


class DetectorRunner:
    def __init__(self, spec: DetectorSpec, settings: DetectorSettings, triton: TritonSettings | None = None,
                 trunks: SharedTrunks | None = None) -> None:
        """``trunks``: where a detector that declares a trunk gets its branch (in-process, or the shared-trunk
        ensemble on Triton); without them, or when they do not serve it, it loads its own model."""
        self.spec = spec
        self.stats = DetectorStats()
        self._triton = triton or TritonSettings()
        self.backend_kind = settings.backend_for(spec.name)
        if self.backend_kind == "triton" and spec.triton_model is None:
            # A third-party detector with no Triton model still runs: in-process, and said so once.
            log.warning("detector.no_triton_model", detector=spec.name, backend="inprocess")
            self.backend_kind = "inprocess"
        self._trunks = trunks if trunks is not None and trunks.serves(spec, self.backend_kind) else None
        self._timeout_s = settings.timeout_s
        self._ctx = LoadContext(device=settings.device, options=settings.options.get(spec.name, {}))
        self._breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"detector-{spec.name}")
        self._backend: DetectorBackend | None = None
        self.load_error: str | None = None

    @property
    def ready(self) -> bool:
        return self._backend is not None and not self._breaker.is_open and self.available()

    def available(self) -> bool:
        """Whether the backend's server (if it has one) can answer now; in-process backends always can."""
        probe = getattr(self._backend, "ready", None)
        return self._backend is not None and (probe is None or bool(probe()))

    def start(self) -> None:
        """Load the backend. A detector that fails to load reports an error score on every call."""
        t0 = time.perf_counter()
        try:
            self._backend = self._load()
        except Exception as exc:  # noqa: BLE001 - a broken detector must not stop the others
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("detector.load_failed", detector=self.spec.name, error=self.load_error)
            return
        log.info("detector.loaded", detector=self.spec.name, version=self.spec.version, backend=self.backend_kind,
                 shared_trunk=self._trunks is not None, seconds=round(time.perf_counter() - t0, 3))

    def _load(self) -> DetectorBackend:
        if self.backend_kind == "triton":
            require("the Triton detector backend", "triton-client")
            if self._trunks is not None:
                return self._trunks.backend(self.spec, self._ctx, "triton")
            from streamguard.backends.triton_grpc import TritonBackend

            model = self._triton.models.get(self.spec.name, self.spec.triton_model)
            assert model is not None
            if self.spec.triton_backend is not None:
                return self.spec.triton_backend(model, self._triton, self.spec.served_version)
            return TritonBackend(model, self._triton, expected_version=self.spec.served_version,
                                 detector=self.spec.name)
        if self._trunks is not None:
            return self._trunks.backend(self.spec, self._ctx, "inprocess")
        return self.spec.load(self._ctx)

    def submit(self, batch: Sequence[DetectorInput]) -> Future[list[float | None]] | str:
        """Start a call; returns a future, or the error string when the call is refused up front."""
        if self._backend is None:
            return f"not loaded: {self.load_error or 'start() was not called'}"
        if not self._breaker.allow():
            self.stats.rejected_open += 1
            return "circuit open after repeated failures"
        backend = self._backend
        contract = self.spec.contract
        if contract is None or not contract.multiview:
            return self._executor.submit(lambda: list(backend.predict(batch)))
        # Several views an image (a multi-crop contract): the backend sees each view as an image of its own,
        # so in-process, trunk and Triton backends need nothing new; the views' logits are then aggregated.
        counts = [len(x.views) for x in batch]
        flat = [DetectorInput(view, x.image) for x in batch for view in x.views]

        def views() -> list[float | None]:
            logits = list(backend.predict(flat))
            if len(logits) != len(flat):
                return logits  # the length check in collect reports it
            out, at = [], 0
            for n in counts:
                out.append(aggregate_logits(logits[at:at + n], contract.aggregate))
                at += n
            return out

        return self._executor.submit(views)

    def collect(self, pending: Future[list[float | None]] | str, n: int, started: float,
                queued: int = 0) -> list[DetectorScore]:
        """Wait for a submitted call and build scores. ``queued``: the calls submitted before it since
        ``started`` (a batch larger than `detectors.batch_size`). They run first, one at a time, on the
        detector's thread, so the call may finish up to ``queued + 1`` timeouts after ``started``: the timeout
        is per call whatever the batch, and a hung call still ends every call behind it in bounded time."""
        self.stats.calls += 1
        self.stats.images += n
        error: str | None = pending if isinstance(pending, str) else None
        logits: list[float | None] = []
        if isinstance(pending, Future):
            try:
                logits = pending.result(timeout=self._time_left(started, queued + 1))
                if len(logits) != n:
                    error = f"returned {len(logits)} logits for {n} images"
            except FutureTimeout:
                self.stats.timeouts += 1
                error = f"timed out after {self._timeout_s:g}s"
            except BackendUnavailable as exc:
                # Not the detector's failure: its breaker is left alone, and nothing is scored.
                self.stats.unavailable += 1
                log.warning("detector.unavailable", detector=self.spec.name, images=n, reason=str(exc)[:300])
                raise DetectorUnavailable(self.spec.name, str(exc)) from exc
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
            self._breaker.record(error is None)
        latency_ms = (time.perf_counter() - started) * 1000.0
        if error is not None:
            self.stats.errors += 1
            log.warning("detector.failed", detector=self.spec.name, error=error, images=n)
            return [self._score(None, latency_ms, error) for _ in range(n)]
        return [self._score(raw, latency_ms, None) for raw in logits]

    def _time_left(self, started: float, calls: int) -> float | None:
        """What is left of ``calls`` timeouts since ``started``; None (wait for the model) without a timeout."""
        if self._timeout_s is None:
            return None
        return max(self._timeout_s * calls - (time.perf_counter() - started), 0.0)

    def _score(self, raw: float | None, latency_ms: float, error: str | None) -> DetectorScore:
        if error is None and raw is not None and not math.isfinite(raw):
            error, raw = "non-finite logit", None
        raw = None if raw is None or error else float(raw)
        calibration = self.spec.calibration
        return DetectorScore(
            detector=self.spec.name,
            version=self.spec.version,
            raw_logit=raw,
            logit=None if raw is None else calibration.apply(raw),
            probability=None if raw is None else calibration.probability(raw),
            latency_ms=latency_ms,
            error=error,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._backend is not None:
            try:
                self._backend.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("detector.close_failed", detector=self.spec.name, error=str(exc))
