"""Prometheus metrics of one worker, on a registry of its own (no process-global collectors)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_in = Counter("streamguard_events_in", "Records consumed.", registry=r)
        # tenant: a configured tenant's name, "default", or "other" (unconfigured names are unbounded).
        self.verdicts_out = Counter("streamguard_verdicts", "Verdicts published, by label, decider and tenant.",
                                    ["label", "decided_by", "tenant"], registry=r)
        self.dead_letters = Counter(
            "streamguard_dead_letters", "Dead letters published, by error type and tenant.", ["reason", "tenant"],
            registry=r,
        )
        self.review_requests = Counter("streamguard_review_requests", "Verdicts also sent to human review.",
                                       ["reason", "tenant"], registry=r)
        self.bank_hits = Counter("streamguard_bank_hits", "Events answered from a hash bank, by match kind.",
                                 ["kind", "tenant"], registry=r)
        self.dedupe_hits = Counter("streamguard_dedupe_hits", "Dedupe hits by kind (exact, near, batch).",
                                   ["kind"], registry=r)
        self.degraded_verdicts = Counter(
            "streamguard_degraded_verdicts", "Verdicts judged without some failed detector (never cached).",
            registry=r,
        )
        self.unknown_fields = Counter(
            "streamguard_event_unknown_fields", "Event fields this version does not know, dropped on reading.",
            registry=r,
        )
        self.unreadable_records = Counter(
            "streamguard_unreadable_records", "Records the Kafka client could not read, skipped as dead letters.",
            registry=r,
        )
        self.dedupe_cache_unreadable = Counter(
            "streamguard_dedupe_cache_unreadable", "Cached verdicts this version cannot read, treated as misses.",
            registry=r,
        )
        self.dedupe_unavailable = Counter(
            "streamguard_dedupe_unavailable", "Records processed without dedupe because Redis was down.",
            registry=r,
        )
        self.stage_seconds = Histogram(
            "streamguard_stage_seconds", "Time per pipeline stage.", ["stage"], buckets=_STAGE_BUCKETS, registry=r
        )
        self.in_flight = Gauge("streamguard_in_flight", "Records consumed but not yet committable.", registry=r)
        self.consumer_lag = Gauge("streamguard_consumer_lag", "High watermark minus position.",
                                  ["topic", "partition"], registry=r)
        self.detector_errors = Counter("streamguard_detector_errors", "Detector calls that failed.",
                                       ["detector"], registry=r)
        self.detector_timeouts = Counter("streamguard_detector_timeouts", "Detector calls that timed out.",
                                         ["detector"], registry=r)
        self.paused_partitions = Gauge("streamguard_paused_partitions", "Partitions paused by flow control.",
                                       registry=r)
        self.commits = Counter("streamguard_commits", "Offset commits sent.", registry=r)
        self.outage = Gauge("streamguard_detector_outage",
                            "1 while the stream is held because a detector's server is unavailable.", registry=r)
        self.outages = Counter("streamguard_detector_outages", "Detector-server outages survived.", registry=r)
        self.outage_seconds = Counter("streamguard_detector_outage_seconds",
                                      "Time spent holding the stream for a detector server.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
