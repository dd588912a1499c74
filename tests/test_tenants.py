"""Tenants: each event is decided under its tenant's policy, deduplicated in its tenant's pool (or a shared
one that still names no other tenant's events), and counted under a bounded tenant label."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest

from images import encode, solid
from stack import Topics, WorkerProcess, produce, wait_for_outcomes, worker_env
from streamguard.config import load_settings
from streamguard.dedupe.redis_store import RedisDedupe
from streamguard.devstack import Service
from streamguard.schemas import ImageEvent
from streamguard.streamio import event_message
from streamguard.tenants import Tenants
from streamguard.wire import encode_event
from test_processor import Pipeline

# p = sigmoid(10 * (200/255 - 0.5)) = 0.945: ai_generated at 0.9, uncertain at 0.99.
GRAY = 200
TENANTS = {
    "lenient": {"ai_threshold": 0.9},
    "strict": {"ai_threshold": 0.99},
    "shared-lenient": {"ai_threshold": 0.9, "share_dedupe": True},
    "shared-strict": {"ai_threshold": 0.99, "share_dedupe": True},
}


def _msg(event_id: str, image: bytes, tenant: str):  # type: ignore[no-untyped-def]
    return event_message(ImageEvent(event_id=event_id, image=image, tenant=tenant), "binary")


def test_two_tenants_get_their_own_labels_and_never_each_other_s_event_ids(kafka: Service, redis_service: Service,
                                                                          tmp_path: Path) -> None:
    topics = Topics(kafka.address).create()
    image = encode(solid(GRAY), "PNG")
    env = worker_env(topics, f"redis://{redis_service.address}/0", STREAMGUARD_TENANTS=json.dumps(TENANTS))
    worker = WorkerProcess(env, tmp_path)
    try:
        first = produce(topics, [_msg("lenient-1", image, "lenient"), _msg("shared-lenient-1", image, "shared-lenient")])
        wait_for_outcomes(topics, first)
        # Judged and cached now: the same content again, for each tenant.
        second = produce(topics, [_msg("strict-1", image, "strict"), _msg("lenient-2", image, "lenient"),
                                  _msg("shared-strict-1", image, "shared-strict")])
        outcomes = wait_for_outcomes(topics, first + second)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    by_id = {v["event_id"]: v for v in outcomes.verdicts}
    labels = {event_id: v["label"] for event_id, v in by_id.items()}
    assert labels == {"lenient-1": "ai_generated", "lenient-2": "ai_generated", "strict-1": "uncertain",
                      "shared-lenient-1": "ai_generated", "shared-strict-1": "uncertain"}
    for event_id, verdict in by_id.items():
        tenant = event_id.rsplit("-", 1)[0]
        assert verdict["tenant"] == tenant and verdict["explanation"]["tenant"] == tenant
        named = {verdict["duplicate_of"], (verdict["near_duplicate_of"] or {}).get("event_id")} - {None}
        assert all(other.rsplit("-", 1)[0] == tenant for other in named), (event_id, named)
    # Own pools: the strict tenant scored its copy itself; the lenient one reused its own first verdict.
    assert by_id["strict-1"]["duplicate_of"] is None and "detect" in by_id["strict-1"]["timings_ms"]
    assert by_id["lenient-2"]["duplicate_of"] == "lenient-1" and "detect" not in by_id["lenient-2"]["timings_ms"]
    # The shared pool answered without detectors, under the asking tenant's thresholds, by content hash only.
    shared = by_id["shared-strict-1"]
    assert "detect" not in shared["timings_ms"] and shared["duplicate_of"] is None
    assert shared["scores"] == by_id["shared-lenient-1"]["scores"]
    assert shared["explanation"]["ai_threshold"] == 0.99
    (evidence,) = shared["explanation"]["evidence"]
    assert evidence["kind"] == "shared_cache" and evidence["detail"]["content_sha256"] == shared["content_sha256"]


def test_metrics_name_configured_tenants_and_fold_the_rest_into_other() -> None:
    settings = load_settings(tenants={"acme": {}})
    pipeline = Pipeline(settings)
    image = encode(solid(GRAY), "PNG")
    try:
        pipeline.run(*(encode_event(ImageEvent(event_id=f"e{i}", image=image, tenant=tenant), "binary")
                       for i, tenant in enumerate(["acme", None, "stranger-1", "stranger-2"])),
                     encode_event(ImageEvent(event_id="bad", image=b"\x89PNG broken", tenant="stranger-3"), "binary"))
    finally:
        pipeline.close()
    text = pipeline.metrics.render().decode()
    tenants = {line.split('tenant="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith(("streamguard_verdicts_total", "streamguard_dead_letters_total"))}
    assert tenants == {"acme", "default", "other"}
    assert pipeline.metric("streamguard_verdicts_total") == 0  # labelled only: never one sample per tenant name
    ((_, letter),) = pipeline.sink.dead_letters
    assert letter.tenant == "stranger-3"  # the record itself keeps the real name
    assert {v.tenant for _, v in pipeline.sink.verdicts} == {"acme", "default", "stranger-1", "stranger-2"}


def test_pools_are_scoped_per_tenant_unless_shared(redis_service: Service) -> None:
    settings = load_settings(redis={"url": f"redis://{redis_service.address}/0"},
                             dedupe={"namespace": f"p{uuid.uuid4().hex[:8]}"},
                             tenants={"a": {}, "b": {}, "c": {"share_dedupe": True}, "d": {"share_dedupe": True}})
    tenants = Tenants(settings)
    keys = {name: tenants.resolve(name).dedupe_key("v") for name in ("a", "b", "c", "d", None)}
    assert len({keys["a"], keys["b"], keys["c"], keys[None]}) == 4 and keys["c"] == keys["d"]
    assert keys[None] == "v"  # the default tenant keeps the key caches had before tenants
    pipeline = Pipeline(settings, RedisDedupe(settings.dedupe, settings.redis))
    image = encode(solid(GRAY), "PNG")
    try:
        for i, tenant in enumerate(["a", "b", "a", "c", "d"]):
            pipeline.run(encode_event(ImageEvent(event_id=f"{tenant}{i}", image=image, tenant=tenant), "binary"))
    finally:
        pipeline.close()
    duplicate_of = {v.event_id: v.duplicate_of for _, v in pipeline.sink.verdicts}
    assert duplicate_of == {"a0": None, "b1": None, "a2": "a0", "c3": None, "d4": None}
    scored = {v.event_id for _, v in pipeline.sink.verdicts if "detect" in v.timings_ms}
    assert scored == {"a0", "b1", "c3"}  # d reused c's verdict without learning its event id


def test_a_tenant_with_its_thresholds_reversed_is_refused() -> None:
    with pytest.raises(ValueError, match="real_threshold must be below ai_threshold"):
        Tenants(load_settings(tenants={"bad": {"ai_threshold": 0.3}}))
