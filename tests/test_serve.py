"""`streamguard serve` over real HTTP on loopback: the check API answers with the worker's verdicts.

The service runs in this process with the test brightness detector (the CLIP ones cost ~0.7 s an image
here); requests go through httpx or a raw socket where the test is about bytes on the wire; dedupe uses
the session's real Redis. One test runs the `streamguard serve` command itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from images import encode, noise, png_bomb, solid, truncated_jpeg
from streamguard.config import Settings, load_settings
from streamguard.dedupe import NullDedupe, open_store
from streamguard.dedupe.store import DedupeStore
from streamguard.devstack import Service
from streamguard.fetch import ImageFetcher
from streamguard.plugins import build_plugin_manager
from streamguard.schemas import ImageEvent, Verdict
from streamguard.serve.app import CheckService, NoApiKeys, ReviewQueueUnavailable
from streamguard.serve.auth import KeyFileError, KeyRing
from streamguard.serve.ratelimit import RateLimiter, retry_after_header
from streamguard.wire import encode_event
from streamguard.worker.loop import build_scorer
from streamguard.worker.metrics import WorkerMetrics
from streamguard.worker.processor import BatchProcessor
from streamguard.worker.publish import ListPublisher
from streamguard.worker.records import InRecord

KEY = "sg-test-key-0123456789abcdef"
OTHER_KEY = "sg-other-key-fedcba9876543210"
ROOT = Path(__file__).resolve().parent.parent


def hashed(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def serve_settings(**sections: Any) -> Settings:
    serve = {"host": "127.0.0.1", "port": 0,
             "api_keys": [{"name": "main", "sha256": hashed(KEY)}, {"name": "other", "sha256": hashed(OTHER_KEY)}]}
    serve.update(sections.pop("serve", {}))
    worker = {"health_host": "127.0.0.1", "health_port": 0, **sections.pop("worker", {})}
    sections.setdefault("dedupe", {"enabled": False})
    # Explicit, not only conftest's environment: a module-scoped service is built before that applies.
    sections.setdefault("plugins", {"deny": ["builtin-univfd", "builtin-pinclip", "builtin-mpft"]})
    return load_settings(serve=serve, worker=worker, **sections)


def redis_sections(redis_service: Service, namespace: str | None = None, **dedupe: Any) -> dict[str, Any]:
    return {"redis": {"url": f"redis://{redis_service.address}/0"},
            "dedupe": {"namespace": namespace or f"s{uuid.uuid4().hex[:8]}", **dedupe}}


@contextmanager
def serving(settings: Settings) -> Iterator[CheckService]:
    service = CheckService(settings, build_plugin_manager(settings.plugins)).start()
    try:
        yield service
    finally:
        service.stop(drain_s=5)


def url(service: CheckService, path: str = "/v1/check") -> str:
    return f"http://127.0.0.1:{service.port}{path}"


def auth(key: str = KEY, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def post_image(client: httpx.Client, service: CheckService, data: bytes, key: str = KEY,
               content_type: str = "image/png", **headers: str) -> httpx.Response:
    return client.post(url(service), content=data, headers=auth(key, **{"Content-Type": content_type}, **headers))


def png(value: int, size: tuple[int, int] = (48, 40)) -> bytes:
    return encode(solid(value, size), "PNG")


def worker_verdicts(settings: Settings, images: dict[str, bytes], dedupe: DedupeStore | None = None,
                    batch: int = 16, tenant: str | None = None) -> dict[str, Verdict]:
    """What the worker publishes for ``images`` (event id -> bytes): its BatchProcessor and scorer, a list
    for a sink."""
    pm = build_plugin_manager(settings.plugins)
    scorer = build_scorer(settings, pm).start()
    sink = ListPublisher(settings.worker)
    processor = BatchProcessor(settings, scorer, dedupe or NullDedupe(), ImageFetcher(settings.fetch, 1 << 24),
                               sink, WorkerMetrics(), owner=f"w-{uuid.uuid4().hex[:6]}")
    records = []
    for offset, (event_id, data) in enumerate(images.items()):
        value, headers = encode_event(ImageEvent(event_id=event_id, image=data, tenant=tenant), "binary")
        records.append(InRecord("images", 0, offset, 0, None, value, tuple(headers)))
    try:
        for start in range(0, len(records), batch):
            processor.process(records[start:start + batch])
    finally:
        processor.close()
        scorer.close()
    assert not sink.dead_letters
    return {verdict.event_id: verdict for _, verdict in sink.verdicts}


def judgement(verdict: Verdict | dict[str, Any]) -> tuple[Any, ...]:
    v = verdict if isinstance(verdict, Verdict) else Verdict.model_validate(verdict)
    return (v.content_sha256, v.label, v.probability, tuple((s.detector, s.probability, s.logit) for s in v.scores),
            v.model_versions, v.policy_version, v.degraded)


def metric(service: CheckService, name: str, **labels: str) -> float:
    value = service.metrics.worker.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def corpus(distinct: int = 48, repeats: int = 12) -> dict[str, bytes]:
    """Distinct images over the brightness detector's whole range (solid PNGs, JPEGs, noise, a large JPEG
    decoded at reduced size), then copies of some, which dedupe must answer with the same judgement."""
    images: dict[str, bytes] = {}
    for i in range(distinct):
        kind, gray = i % 4, round(255 * i / (distinct - 1))
        if kind == 0:
            data = png(gray, (40 + i, 36))
        elif kind == 1:
            data = encode(solid(gray, (64, 48 + i)), "JPEG", quality=85)
        elif kind == 2:
            data = encode(noise((56, 40), seed=i), "PNG")
        else:
            data = encode(noise((900, 700), seed=i), "JPEG", quality=80)
        images[f"img-{i}"] = data
    images["img-bright"] = png(252)  # past the policy's 0.99
    for j in range(repeats):
        images[f"copy-{j}"] = images[f"img-{(7 * j) % distinct}"]
    return images


# -- the worker's verdicts ----------------------------------------------------------------------------------


def test_concurrent_checks_get_the_workers_verdicts(redis_service: Service) -> None:
    # A slow detector makes checks queue up while a batch is judged, so they are micro-batched.
    detectors = {"options": {"brightness": {"delay_s": 0.03}}}
    images = corpus()
    worker_settings = load_settings(detectors=detectors, **redis_sections(redis_service))
    expected = worker_verdicts(worker_settings, images, open_store(worker_settings.dedupe, worker_settings.redis))
    settings = serve_settings(detectors=detectors, serve={"burst": 1000}, **redis_sections(redis_service))
    with serving(settings) as service, httpx.Client(timeout=30) as client:
        def check(item: tuple[str, bytes]) -> httpx.Response:
            event_id, data = item
            return post_image(client, service, data, content_type="image/jpeg",
                              **{"X-Streamguard-Event-Id": event_id})

        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = dict(zip(images, pool.map(check, images.items()), strict=True))

        assert {r.status_code for r in responses.values()} == {200}, {k: r.text for k, r in responses.items()
                                                                      if r.status_code != 200}
        for event_id, response in responses.items():
            body = response.json()
            assert body["event_id"] == event_id
            assert judgement(body) == judgement(expected[event_id]), event_id
        labels = {r.json()["label"] for r in responses.values()}
        assert labels == {"ai_generated", "real", "uncertain"}  # the corpus spans the policy's range
        assert any(r.json()["duplicate_of"] for r in responses.values())  # copies were answered by dedupe

        assert metric(service, "streamguard_http_requests_total", status="200") == len(images)
        assert metric(service, "streamguard_http_request_seconds_count") == len(images)
        batches = metric(service, "streamguard_http_batch_size_count")
        assert 0 < batches < len(images)  # concurrent checks were judged together
        metrics_text = httpx.get(f"http://127.0.0.1:{service.health_port}/metrics").text
        assert 'streamguard_http_requests_total{status="200"} 61.0' in metrics_text
        assert "streamguard_stage_seconds_bucket" in metrics_text  # the pipeline's own metrics beside them


def test_a_check_reuses_what_the_worker_judged_from_the_shared_dedupe_cache(redis_service: Service) -> None:
    sections = redis_sections(redis_service)
    worker_settings = load_settings(**sections)
    image = png(200)
    (judged,) = worker_verdicts(worker_settings, {"from-stream": image},
                                open_store(worker_settings.dedupe, worker_settings.redis)).values()
    with serving(serve_settings(**sections)) as service, httpx.Client() as client:
        response = post_image(client, service, image)
    assert response.status_code == 200
    verdict = Verdict.model_validate(response.json())
    assert verdict.duplicate_of == "from-stream" and verdict.event_id != "from-stream"
    assert judgement(verdict) == judgement(judged)


def test_content_another_worker_is_scoring_waits_for_its_lease_without_holding_up_others(
        redis_service: Service) -> None:
    settings = serve_settings(**redis_sections(redis_service, lease_ms=800))
    image = png(120)
    with serving(settings) as service, httpx.Client(timeout=30) as client:
        store = open_store(settings.dedupe, settings.redis)
        assert store.acquire(hashlib.sha256(image).hexdigest(), "another-worker")  # it never finishes
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=1) as pool:
            leased = pool.submit(lambda: (post_image(client, service, image), time.monotonic() - t0))
            time.sleep(0.1)
            other = post_image(client, service, png(30))
            other_s = time.monotonic() - t0
            leased_response, leased_s = leased.result()
    assert other.status_code == 200 and leased_response.status_code == 200
    assert other_s < leased_s and leased_s >= 0.6  # deferred until the lease expired, then scored here
    assert leased_response.json()["duplicate_of"] is None


# -- JSON checks by URI -------------------------------------------------------------------------------------


@contextmanager
def image_host(files: dict[str, bytes]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            data = files.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_uri_check_is_fetched_and_judged_like_an_upload() -> None:
    image = png(230)
    settings = serve_settings(fetch={"allow_networks": ["127.0.0.1/32"]})
    with image_host({"/a.png": image}) as host, serving(settings) as service, httpx.Client() as client:
        by_uri = client.post(url(service), headers=auth(),
                             json={"uri": f"{host}/a.png", "tenant": "t1", "event_id": "by-uri"})
        upload = post_image(client, service, image)
        missing = client.post(url(service), headers=auth(), json={"uri": f"{host}/gone.png"})
        private = client.post(url(service), headers=auth(), json={"uri": "http://10.255.255.1/x.png"})
    assert by_uri.status_code == 200 and by_uri.json()["event_id"] == "by-uri"
    assert judgement(by_uri.json()) == judgement(upload.json())
    assert missing.status_code == 502 and missing.json()["error"] == "FetchFailed"
    assert private.status_code == 422 and private.json()["error"] == "FetchRefused"


# -- refusals ---------------------------------------------------------------------------------------------


TENANTS = {"strict": {"ai_threshold": 0.6, "real_threshold": 0.3}}


@pytest.fixture(scope="module")
def service() -> Iterator[CheckService]:
    settings = serve_settings(tenants=TENANTS, serve={"max_body_bytes": 64 * 1024, "api_keys": [
        {"name": "main", "sha256": hashed(KEY)},
        {"name": "tenant-a", "sha256": hashed("key-for-a"), "tenant": "a"},
        {"name": "slow", "sha256": hashed("slow-key"), "rate_per_s": 0.1, "burst": 3},
    ]})
    with serving(settings) as s:
        yield s


def test_bad_input_gets_a_4xx_with_the_reason(service: CheckService) -> None:
    with httpx.Client() as client:
        def answer(response: httpx.Response) -> tuple[int, str]:
            return response.status_code, response.json()["error"]

        assert answer(post_image(client, service, truncated_jpeg((128, 128)), content_type="image/jpeg")) == (
            400, "CorruptImage")
        assert answer(post_image(client, service, b"just some text, not an image")) == (400, "UnsupportedFormat")
        assert answer(post_image(client, service, b"")) == (400, "EmptyImage")
        assert answer(post_image(client, service, png_bomb())) == (413, "TooLarge")
        assert answer(post_image(client, service, png(9), content_type="text/plain")) == (415, "UnsupportedMediaType")
        assert answer(post_image(client, service, png(9), **{"X-Streamguard-Event-Id": "x" * 300})) == (
            422, "SchemaError")

        unknown = client.post(url(service), headers=auth(), json={"url": "http://example.com/a.png"})
        assert answer(unknown) == (422, "SchemaError") and "url" in unknown.json()["reason"]
        ftp = client.post(url(service), headers=auth(), json={"uri": "ftp://example.com/a.png"})
        assert answer(ftp) == (422, "SchemaError")
        broken = client.post(url(service), headers=auth(**{"Content-Type": "application/json"}), content=b"{nope")
        assert answer(broken) == (422, "SchemaError")

        chunked = client.post(url(service), headers=auth(**{"Content-Type": "image/png"}),
                              content=iter([png(9)]))  # an iterator is sent chunked
        assert answer(chunked) == (411, "LengthRequired")
        assert answer(client.get(url(service))) == (405, "MethodNotAllowed")
        assert answer(client.post(url(service, "/v1/other"), headers=auth(), content=b"")) == (404, "NotFound")

        ok = post_image(client, service, png(9))
        assert ok.status_code == 200 and ok.json()["label"] == "real"
    assert metric(service, "streamguard_http_requests_total", status="400") >= 3


def test_an_unauthenticated_request_gets_401(service: CheckService) -> None:
    with httpx.Client() as client:
        none = client.post(url(service), content=png(9), headers={"Content-Type": "image/png"})
        wrong = post_image(client, service, png(9), key="not-a-key")
        assert none.status_code == wrong.status_code == 401
        assert none.headers["WWW-Authenticate"].startswith("Bearer")
        assert none.json()["error"] == "Unauthorized"
        by_header = client.post(url(service), content=png(9), headers={"Content-Type": "image/png", "X-API-Key": KEY})
        assert by_header.status_code == 200

        # A key bound to a tenant checks for that tenant only.
        assert post_image(client, service, png(9), key="key-for-a").status_code == 200
        assert post_image(client, service, png(9), key="key-for-a", **{"X-Streamguard-Tenant": "a"}).status_code == 200
        other = post_image(client, service, png(9), key="key-for-a", **{"X-Streamguard-Tenant": "b"})
        assert other.status_code == 403 and "'a'" in other.json()["reason"]

        # Probes and scrapes need no key (they are on the health port, as the worker's).
        health = f"http://127.0.0.1:{service.health_port}"
        assert client.get(f"{health}/healthz").status_code == 200
        ready = client.get(f"{health}/readyz")
        assert ready.status_code == 200 and ready.json()["detectors"]["brightness"] is True


def test_a_check_is_decided_under_its_tenants_policy_as_the_worker_decides_it(service: CheckService) -> None:
    image = png(200)  # fused probability 0.945: uncertain by default, ai_generated at strict's 0.6
    expected = worker_verdicts(load_settings(tenants=TENANTS), {"w": image}, tenant="strict")["w"]
    with httpx.Client() as client:
        by_header = post_image(client, service, image, **{"X-Streamguard-Tenant": "strict"})
        by_query = client.post(url(service) + "?tenant=strict", content=image,
                               headers=auth(**{"Content-Type": "image/png"}))
        default = post_image(client, service, image)
    assert by_header.json()["label"] == by_query.json()["label"] == "ai_generated"
    assert by_header.json()["tenant"] == "strict"
    assert judgement(by_header.json()) == judgement(by_query.json()) == judgement(expected)
    assert default.json()["label"] == "uncertain"


def test_keys_from_a_secret_file_are_read_again_when_it_changes(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# name key [tenant]\nplain  s3cret-plain-key  t1\nhashed sha256:{hashed('s3cret-hashed')}\n")
    settings = serve_settings(serve={"api_keys": [], "api_keys_file": str(keys)})
    with serving(settings) as service, httpx.Client() as client:
        assert post_image(client, service, png(9), key="s3cret-plain-key").status_code == 200
        assert post_image(client, service, png(9), key="s3cret-hashed").status_code == 200
        assert post_image(client, service, png(9), key="s3cret-plain-key",
                          **{"X-Streamguard-Tenant": "t2"}).status_code == 403
        keys.write_text("rotated new-key\n")
        os.utime(keys, ns=(time.time_ns(), time.time_ns() + 10**9))  # a coarse clock must still see a change
        time.sleep(1.2)
        assert post_image(client, service, png(9), key="s3cret-plain-key").status_code == 401
        assert post_image(client, service, png(9), key="new-key").status_code == 200


def test_misconfigured_keys_are_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(NoApiKeys):
        CheckService(serve_settings(serve={"api_keys": []}), build_plugin_manager(load_settings().plugins))
    bad = tmp_path / "keys"
    bad.write_text("name-only\n")
    with pytest.raises(KeyFileError, match=":1:"):
        KeyRing(load_settings(serve={"api_keys_file": str(bad)}).serve)


def test_over_the_rate_limit_gets_429_with_retry_after(service: CheckService) -> None:
    with httpx.Client() as client:
        statuses = [post_image(client, service, png(9), key="slow-key").status_code for _ in range(3)]
        limited = post_image(client, service, png(9), key="slow-key")
        assert statuses == [200, 200, 200]
        assert limited.status_code == 429 and limited.json()["error"] == "RateLimited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 10  # a token every 10 s at 0.1/s
        assert post_image(client, service, png(9)).status_code == 200  # other keys have their own buckets


def test_token_buckets_refill_at_their_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.take("k", rate=2.0, burst=2) for _ in range(3)] == [0.0, 0.0, 0.5]
    now[0] = 0.25
    assert limiter.take("k", rate=2.0, burst=2) == pytest.approx(0.25)
    now[0] = 10.0  # refills up to the burst, no further
    assert [limiter.take("k", rate=2.0, burst=2) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert retry_after_header(0.01) == "1" and retry_after_header(1.2) == "2"


def _raw(port: int, head: bytes, body: bytes = b"", read_timeout_s: float = 5.0) -> bytes:
    """Send ``head`` (and ``body``), then read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s) as conn:
        conn.sendall(head + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


def test_an_oversize_body_gets_413_before_it_is_sent(service: CheckService) -> None:
    head = (f"POST /v1/check HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {50 * 1024 * 1024}\r\n").encode()
    t0 = time.monotonic()
    # Not a byte of the 50 MB body is sent: the answer comes from the headers alone.
    answer = _raw(service.port, head + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"exceeds the limit of 65536" in answer
    assert time.monotonic() - t0 < 3
    # A client that asks first (Expect: 100-continue) is refused without a 100 Continue ...
    answer = _raw(service.port, head + b"Expect: 100-continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer
    # ... and a body within the cap is invited, then judged.
    image = png(252)
    small = (f"POST /v1/check HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: image/png\r\n"
             f"Content-Length: {len(image)}\r\nExpect: 100-continue\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as conn:
        conn.sendall(small)
        assert conn.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        conn.sendall(image)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"label":"ai_generated"' in answer
    # A client that sends an over-cap body anyway still reads the 413.
    with httpx.Client() as client:
        sent = post_image(client, service, os.urandom(200 * 1024))
    assert sent.status_code == 413 and sent.json()["error"] == "TooLarge"


def test_a_full_queue_answers_503_at_once() -> None:
    # One check judged at a time, 0.3 s each, one waiting: the rest of a burst is turned away, not queued.
    settings = serve_settings(serve={"max_queue": 1, "batch_size": 1, "threads": 8},
                              detectors={"options": {"brightness": {"delay_s": 0.3}}})
    with serving(settings) as service, httpx.Client(timeout=30) as client:
        barrier = threading.Barrier(6)

        def check(value: int) -> httpx.Response:
            barrier.wait()
            return post_image(client, service, png(value))

        with ThreadPoolExecutor(max_workers=6) as pool:
            responses = list(pool.map(check, range(10, 70, 10)))
        busy = [r for r in responses if r.status_code == 503]
        assert {r.status_code for r in responses} == {200, 503}
        assert all(r.json()["error"] == "Overloaded" and r.headers["Retry-After"] == "1" for r in busy)
        assert post_image(client, service, png(10)).status_code == 200  # and it recovers


# -- the command ------------------------------------------------------------------------------------------


def test_the_serve_command_answers_checks_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "STREAMGUARD_SERVE__API_KEYS": json.dumps([{"name": "cli", "sha256": hashed(KEY)}]),
           "STREAMGUARD_WORKER__HEALTH_PORT": "0", "STREAMGUARD_WORKER__HEALTH_HOST": "127.0.0.1",
           "STREAMGUARD_DEDUPE__ENABLED": "false", "STREAMGUARD_LOG__FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "streamguard", "serve", "--host", "127.0.0.1", "--port", "0"],
                            env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            if not line:
                break
            if '"serve.listening"' in line:
                port = json.loads(line)["port"]
        assert port is not None, "the server never said where it listens"
        response = httpx.post(f"http://127.0.0.1:{port}/v1/check", content=png(9),
                              headers={"Content-Type": "image/png", "Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200 and response.json()["label"] == "real"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_check_that_needs_a_person_is_queued_for_review_before_it_is_answered(kafka: Service,
                                                                                redis_service: Service) -> None:
    """With `review.topic` set, an uncertain check's review request is on the topic by the time the caller
    has the verdict (as the worker routes it); a confident one is not sent; no broker means 503, not a
    verdict whose review was lost."""
    import json as _json

    from streamguard.devstack import create_topics
    from streamguard.schemas import ReviewRequest
    from streamguard.streamio import TopicReader

    topic = f"r{uuid.uuid4().hex[:8]}.review"
    create_topics(kafka.address, {topic: 1})
    # Review routing also answers from the reviewers' banks, which live in Redis.
    redis = redis_sections(redis_service)
    banks = {"key_prefix": f"{topic}:banks"}
    settings = serve_settings(review={"topic": topic}, kafka={"bootstrap_servers": kafka.address}, banks=banks,
                              **redis)
    with serving(settings) as service, httpx.Client() as client:
        uncertain = post_image(client, service, png(200))  # p 0.945: between the pinned 0.5 and 0.99
        confident = post_image(client, service, png(9))  # p ~0.01: real
        assert uncertain.json()["label"] == "uncertain" and confident.json()["label"] == "real"
        # Read at once: the answer waited for the broker's ack, so the request is there already.
        with TopicReader({"bootstrap_servers": kafka.address}, [topic]) as reader:
            requests = [ReviewRequest.model_validate(_json.loads(r.value)) for r in reader.to_end()]
    assert [r.event_id for r in requests] == [uncertain.json()["event_id"]]
    assert requests[0].content_sha256 == uncertain.json()["content_sha256"] and requests[0].reason == "uncertain"
    dead = serve_settings(review={"topic": topic}, kafka={"bootstrap_servers": "127.0.0.1:9",
                                                          "bootstrap_timeout_s": 2.0}, banks=banks, **redis)
    with pytest.raises(ReviewQueueUnavailable, match="review.topic .* broker cannot be reached"):
        CheckService(dead, build_plugin_manager(dead.plugins))


def test_a_review_request_that_cannot_be_queued_fails_the_check_instead_of_answering_it() -> None:
    from concurrent.futures import Future

    from streamguard.schemas import ReviewRequest
    from streamguard.serve.batcher import FutureSink, ReviewUnavailable

    def broker_gone(request: ReviewRequest) -> None:
        raise TimeoutError("no ack within 30 s")

    sink = FutureSink(review=broker_gone)
    record = InRecord("http", 0, 7, 0, None, b"", ())
    future: Future[object] = sink.expect(record)  # type: ignore[assignment]
    verdict = Verdict(event_id="e", content_sha256="0" * 64, label="uncertain", probability=0.6, scores=[],
                      policy_version="p", model_versions={})
    request = ReviewRequest.model_construct(event_id="e", content_sha256="0" * 64, reason="uncertain")
    sink.verdict(record, verdict, review=request)
    with pytest.raises(ReviewUnavailable, match="no ack"):
        future.result(timeout=1)
    quiet = FutureSink()  # without review.topic a verdict is simply the answer
    future = quiet.expect(record)  # type: ignore[assignment]
    quiet.verdict(record, verdict, review=request)
    assert future.result(timeout=1) is verdict
