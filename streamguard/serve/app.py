"""`streamguard serve` assembled: the worker's scorer, dedupe store and fetcher behind the check API.

Everything that decides a verdict is built as the worker builds it (`build_scorer`, `open_store`,
`ImageFetcher`, `BatchProcessor`), from the same settings, so a check and the stream agree, and share
one dedupe cache: content the worker judged is answered from it here, and the other way round.
Liveness, readiness and metrics are the worker's `HealthServer` on ``worker.health_host:health_port``;
there liveness means the batcher's thread is turning, readiness that a detector can answer.
"""

from __future__ import annotations

import threading
from typing import Any

import pluggy
import structlog

from streamguard.config import Settings
from streamguard.dedupe import DedupeStore, new_owner_id, open_store
from streamguard.fetch import ImageFetcher
from streamguard.serve.auth import KeyRing
from streamguard.serve.batcher import MicroBatcher
from streamguard.serve.http import CheckApi, PooledHTTPServer, handler_class
from streamguard.serve.metrics import ServeMetrics
from streamguard.serve.ratelimit_redis import open_limiter
from streamguard.worker.health import HealthServer, HealthState
from streamguard.worker.loop import build_scorer
from streamguard.worker.metrics import WorkerMetrics
from streamguard.worker.processor import BatchProcessor
from streamguard.schemas import ReviewRequest
from streamguard.worker.publish import Sink, producer_config, review_message

log = structlog.get_logger(__name__)


class ReviewQueueUnavailable(RuntimeError):
    """review.topic is set and its broker cannot be reached at start: checks that need a person could not be
    queued, so the service does not start."""


class ReviewQueue:
    """Review requests of checks, on the stream's review topic (`review.topic`), acknowledged one by one:
    the check's answer waits for the broker, so no answered check has a lost request."""

    def __init__(self, settings: Settings) -> None:
        from kafka import KafkaProducer

        assert settings.review.topic is not None
        self._topic = settings.review.topic
        self._timeout_s = settings.serve.request_timeout_s
        try:
            self._producer = KafkaProducer(**producer_config(settings))
        except Exception as exc:  # noqa: BLE001 - kafka-python raises several types for an unreachable broker
            raise ReviewQueueUnavailable(f"review.topic {self._topic!r} is set but the broker cannot be reached "
                                         f"({type(exc).__name__}: {exc})") from exc

    def send(self, request: ReviewRequest) -> None:
        message = review_message(self._topic, request)
        self._producer.send(message.topic, key=message.key, value=message.value,
                            headers=list(message.headers)).get(timeout=self._timeout_s)

    def close(self) -> None:
        self._producer.close(timeout=5)


class NoApiKeys(ValueError):
    """serve.auth is on, yet no key is configured: every request would be refused."""


class CheckService:
    def __init__(self, settings: Settings, pm: pluggy.PluginManager, dedupe: DedupeStore | None = None) -> None:
        serve = settings.serve
        keys = KeyRing(serve) if serve.auth else None
        if keys is not None and not len(keys):
            raise NoApiKeys("serve.auth is on but no API key is configured: set serve.api_keys (hashed) or "
                            "serve.api_keys_file, or serve.auth = false for local use")
        self._settings = settings
        self.metrics = ServeMetrics(WorkerMetrics())
        self.scorer = build_scorer(settings, pm)
        self.dedupe: DedupeStore = dedupe or open_store(settings.dedupe, settings.redis)
        self._fetcher = ImageFetcher(settings.fetch, settings.intake.max_bytes)
        self._stopping = threading.Event()
        owner = new_owner_id()

        def processor(sink: Sink) -> BatchProcessor:
            # No outage gate: a request cannot be held for minutes; DetectorsUnavailable answers 503.
            return BatchProcessor(settings, self.scorer, self.dedupe, self._fetcher, sink, self.metrics.worker,
                                  owner=owner)

        self.health = HealthState(liveness_timeout_s=settings.worker.liveness_timeout_s)
        self.health.readiness = self._readiness
        self._review = ReviewQueue(settings) if settings.review.topic is not None else None
        self._batcher = MicroBatcher(processor, batch_size=serve.batch_size, batch_wait_s=serve.batch_wait_ms / 1000,
                                     max_queue=serve.max_queue, tick=self._tick,
                                     observe_batch=self.metrics.batch_size.observe,
                                     review=self._review.send if self._review is not None else None)
        self._limiter = open_limiter(settings, lambda reason: self.metrics.ratelimit_fallbacks.labels(reason).inc())
        api = CheckApi(settings=serve, max_image_bytes=serve.max_body_bytes or settings.intake.max_bytes, keys=keys,
                       limiter=self._limiter, batcher=self._batcher, metrics=self.metrics)
        self._server = PooledHTTPServer((serve.host, serve.port), handler_class(api), serve.threads,
                                        serve.max_connections, self.metrics)
        self._health_server = HealthServer.from_settings(self.health, self.metrics.render, settings.worker)
        self._serving = threading.Thread(target=self._server.serve_forever, name="serve-accept", daemon=True)

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def health_port(self) -> int:
        return self._health_server.port

    def start(self) -> CheckService:
        self.scorer.start()
        self._batcher.start()
        self._health_server.start()
        self._serving.start()
        log.info("serve.listening", host=self._settings.serve.host, port=self.port, health_port=self.health_port)
        return self

    def stop(self, drain_s: float | None = None) -> None:
        """Stop taking connections, answer those in flight, then close everything."""
        drain_s = self._settings.worker.drain_timeout_s if drain_s is None else drain_s
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        # The batcher keeps judging until the requests in flight have their answers.
        self._server.finish_requests(timeout_s=drain_s)
        self._batcher.close(timeout_s=drain_s)
        if self._review is not None:
            self._review.close()
        self.scorer.close()
        self.dedupe.close()
        self._limiter.close()
        self._fetcher.close()
        self._health_server.close()
        log.info("serve.stopped")

    def _tick(self) -> None:
        self.health.progress()
        self.metrics.queued.set(self._batcher.depth)

    def _readiness(self) -> dict[str, Any]:
        detectors = {r.spec.name: r.ready for r in self.scorer.runners}
        detectors_ok = not detectors or any(detectors.values())
        stopping = self._stopping.is_set()
        return {
            "ready": detectors_ok and self._batcher.alive and not stopping,
            "detectors": detectors,
            "redis": "up" if self.dedupe.available else "down",
            "queued": self._batcher.depth,
            "stopping": stopping,
        }
