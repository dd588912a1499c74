"""The check API's own Prometheus metrics, on the worker metrics' registry: one /metrics shows the
pipeline's stage timings, verdicts and dead letters beside the requests that caused them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from streamguard.worker.metrics import WorkerMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServeMetrics:
    def __init__(self, worker: WorkerMetrics) -> None:
        r = worker.registry
        self.worker = worker
        self.requests = Counter("streamguard_http_requests", "Check API requests answered, by status.",
                                ["status"], registry=r)
        self.latency = Histogram("streamguard_http_request_seconds",
                                 "Check API request latency, from the request line to the answer.",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("streamguard_http_batch_size", "Checks judged together in one pipeline call.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.queued = Gauge("streamguard_http_queued", "Checks waiting for the pipeline.", registry=r)
        self.refused_connections = Counter("streamguard_http_refused_connections",
                                           "Connections closed at once because serve.max_connections were open.",
                                           registry=r)
        self.ratelimit_fallbacks = Counter(
            "streamguard_http_ratelimit_fallbacks",
            "Requests rate-limited by this process's own buckets because the shared ones in Redis could not "
            "answer: unreachable (down, timed out) or error (Redis answered with one).", ["reason"], registry=r)
        for reason in ("unreachable", "error"):  # at 0 from the start, so a rate() over them has a baseline
            self.ratelimit_fallbacks.labels(reason)

    def render(self) -> bytes:
        return self.worker.render()
