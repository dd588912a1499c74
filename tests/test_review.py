"""Human review against a real broker and Redis: uncertain verdicts reach the review topic, a decision sent
back overrides the verdict, lands in a bank, and answers the next copies (exact and near) without detectors;
the decisions path is at-least-once through a SIGKILL."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stack import Topics, WorkerProcess, missing, produce, read_outcomes, wait_for_outcomes, worker_env
from streamguard import streamio
from streamguard.banks import BankStore
from streamguard.cli.banks import content_hashes
from streamguard.config import load_settings
from streamguard.devstack import Service, create_topics
from streamguard.schemas import ImageEvent, ReviewDecision, ReviewRequest
from streamguard.streamio import Sent, TopicReader, event_message


class ReviewTopics(Topics):
    @property
    def review(self) -> str:
        return f"{self.prefix}.review"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}.decisions"

    def create(self) -> ReviewTopics:
        super().create()
        create_topics(self.bootstrap, {self.review: 2, self.decisions: 2})
        return self


@pytest.fixture
def topics(kafka: Service) -> ReviewTopics:
    return ReviewTopics(kafka.address).create()


def _env(topics: ReviewTopics, redis: Service, **extra: str) -> dict[str, str]:
    return worker_env(topics, f"redis://{redis.address}/0", **{
        "STREAMGUARD_REVIEW__TOPIC": topics.review,
        "STREAMGUARD_REVIEW__DECISIONS_TOPIC": topics.decisions,
        "STREAMGUARD_REVIEW__GROUP_ID": f"{topics.prefix}.review-group",
        "STREAMGUARD_BANKS__KEY_PREFIX": f"{topics.prefix}:banks",
        "STREAMGUARD_BANKS__REFRESH_INTERVAL_S": "0.3",
        **extra,
    })


class ApplyProcess:
    """``streamguard review apply`` as deployed: its own process, killed or stopped like a worker."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "apply") -> None:
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([sys.executable, "-m", "streamguard", "review", "apply"], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(60)

    def kill(self) -> None:
        self.proc.kill()
        self.wait(10)


def _picture(size: int = 512) -> Image.Image:
    """Bright overlapping rectangles: PDQ rates them at full quality, the test detector as uncertain
    (mean brightness ~0.7, p ~0.9: between the default thresholds 0.5 and 0.99)."""
    rng = np.random.default_rng(11)
    image = Image.new("RGB", (size, size), (185, 185, 185))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = (int(v) for v in rng.integers(0, size - 32, 2))
        w, h = (int(v) for v in rng.integers(20, 160, 2))
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=tuple(int(v) for v in rng.integers(110, 255, 3)))
    return image


def _bytes(image: Image.Image, fmt: str, **options: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _records(bootstrap: str, topic: str, count: int, timeout_s: float = 60) -> list[dict]:
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        with TopicReader({"bootstrap_servers": bootstrap}, [topic]) as reader:
            out = [json.loads(r.value) for r in reader.to_end()]
        time.sleep(0.3)
    return out


def _detect_batches(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith('streamguard_stage_seconds_count{stage="detect"}'):
            return float(line.split()[-1])
    return 0.0


def _send_decisions(topics: ReviewTopics, decisions: list[ReviewDecision]) -> list[Sent]:
    messages = [(d.event_id, d.model_dump_json().encode(), []) for d in decisions]
    return streamio.produce({"bootstrap_servers": topics.bootstrap}, topics.decisions, messages)


def test_a_decision_overrides_the_verdict_and_answers_copies_from_the_bank(topics: ReviewTopics,
                                                                          redis_service: Service,
                                                                          tmp_path: Path) -> None:
    picture = _picture()
    original = _bytes(picture, "PNG")
    near_copy = _bytes(picture.resize((384, 384), Image.Resampling.BILINEAR), "JPEG", quality=70)
    env = _env(topics, redis_service)
    worker = WorkerProcess(env, tmp_path)
    applier = ApplyProcess(env, tmp_path)
    try:
        first = produce(topics, [event_message(ImageEvent(event_id="orig", image=original, tenant="acme"))])
        (judged,) = wait_for_outcomes(topics, first).verdicts
        assert judged["label"] == "uncertain" and judged["decided_by"] == "model"
        (request,) = _records(topics.bootstrap, topics.review, 1)
        request = ReviewRequest.model_validate(request)
        assert (request.event_id, request.tenant, request.reason) == ("orig", "acme", "uncertain")
        assert request.content_sha256 == hashlib.sha256(original).hexdigest()
        assert (request.source_topic, request.source_offset) == (topics.input, first[0].offset)
        assert request.pdq is not None and request.pdq_quality >= 50  # type: ignore[operator]
        assert request.explanation is not None and request.scores == [
            *map(type(request.scores[0]).model_validate, judged["scores"])]

        decision = ReviewDecision(event_id=request.event_id, content_sha256=request.content_sha256,
                                  tenant=request.tenant, label="ai_generated", reviewer="alice", note="known generator",
                                  pdq=request.pdq, pdq_quality=request.pdq_quality)
        _send_decisions(topics, [decision])
        deadline = time.monotonic() + 60
        while not (overrides := [v for v in read_outcomes(topics).verdicts if v["decided_by"] == "review"]):
            assert time.monotonic() < deadline, applier.log_path.read_text()[-3000:]
            time.sleep(0.3)
        (override,) = overrides
        assert (override["event_id"], override["label"], override["tenant"]) == ("orig", "ai_generated", "acme")
        assert override["explanation"]["evidence"][0]["name"] == "alice"
        banks = BankStore(load_settings(banks={"key_prefix": f"{topics.prefix}:banks"},
                                        redis={"url": f"redis://{redis_service.address}/0"}))
        try:
            banks.refresh()
            match = banks.match(request.content_sha256, None, ["review-ai"])
        finally:
            banks.close()
        assert match is not None and match.label == "ai_generated" and match.kind == "exact"

        time.sleep(1.0)  # the worker's near index takes in bank additions every 0.3 s
        detected = _detect_batches(worker.health_port)
        copies = produce(topics, [event_message(ImageEvent(event_id="exact", image=original, tenant="acme")),
                                  event_message(ImageEvent(event_id="near", image=near_copy, tenant="acme"))])
        outcomes = wait_for_outcomes(topics, first + copies)
        assert _detect_batches(worker.health_port) == detected  # not one image went to the detectors
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        assert applier.stop() == 0
    by_id = {v["event_id"]: v for v in outcomes.verdicts if v["decided_by"] != "review"}
    for event_id, kind in (("exact", "exact"), ("near", "near")):
        verdict = by_id[event_id]
        assert verdict["label"] == "ai_generated" and verdict["decided_by"] == "bank", verdict
        assert verdict["scores"] == [] and "detect" not in verdict["timings_ms"]
        assert verdict["matched_bank"]["bank"] == "review-ai" and verdict["matched_bank"]["kind"] == kind
        assert verdict["explanation"]["evidence"][0] == {"kind": "bank", "name": "review-ai", "detail": {
            "match": kind, "distance": verdict["matched_bank"]["distance"], "label": "ai_generated"}}
    assert 0 < by_id["near"]["matched_bank"]["distance"] <= 31
    assert len(_records(topics.bootstrap, topics.review, 2, timeout_s=2)) == 1  # banked answers need no person


def test_a_reversed_decision_answers_the_next_copies_with_the_later_label(topics: ReviewTopics,
                                                                         redis_service: Service,
                                                                         tmp_path: Path) -> None:
    picture = _picture()
    original = _bytes(picture, "PNG")
    near_copy = _bytes(picture.resize((384, 384), Image.Resampling.BILINEAR), "JPEG", quality=70)
    content_sha256 = hashlib.sha256(original).hexdigest()
    _, pdq = content_hashes(original, load_settings().intake)  # what the review request would carry
    assert pdq is not None
    # acme lists review-real first: were "real" not withdrawn from it, the reversed decision would keep
    # answering every copy, exact and near (both banks would hold the content at distance 0).
    env = _env(topics, redis_service, STREAMGUARD_TENANTS__ACME__BANKS='["review-real", "review-ai"]')
    decisions = [ReviewDecision(event_id="orig", content_sha256=content_sha256, tenant="acme", label=label,
                                reviewer=reviewer, pdq=pdq.bits.hex(), pdq_quality=pdq.quality)
                 for label, reviewer in (("real", "alice"), ("ai_generated", "carol"))]
    applier = ApplyProcess(env, tmp_path)
    worker = WorkerProcess(env, tmp_path)
    try:
        _send_decisions(topics, decisions)  # one key, one partition: applied in this order
        deadline = time.monotonic() + 60
        while len([v for v in read_outcomes(topics).verdicts if v["decided_by"] == "review"]) < 2:
            assert time.monotonic() < deadline, applier.log_path.read_text()[-3000:]
            time.sleep(0.3)
        time.sleep(1.0)  # the worker's near index takes in bank changes every 0.3 s
        copies = produce(topics, [event_message(ImageEvent(event_id="exact", image=original, tenant="acme")),
                                  event_message(ImageEvent(event_id="near", image=near_copy, tenant="acme"))])
        outcomes = wait_for_outcomes(topics, copies)
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        assert applier.stop() == 0
    by_id = {v["event_id"]: v for v in outcomes.verdicts}
    for event_id in ("exact", "near"):
        verdict = by_id[event_id]
        assert verdict["label"] == "ai_generated" and verdict["decided_by"] == "bank", verdict
        assert (verdict["matched_bank"]["bank"], verdict["matched_bank"]["kind"]) == ("review-ai", event_id)


def test_decisions_survive_a_sigkill_mid_stream(topics: ReviewTopics, redis_service: Service,
                                                tmp_path: Path) -> None:
    # One decision per poll: each is applied, published and committed on its own, so a kill lands mid-stream.
    env = _env(topics, redis_service, STREAMGUARD_REVIEW__BATCH_SIZE="1")
    shas = [hashlib.sha256(f"{topics.prefix}-{i}".encode()).hexdigest() for i in range(200)]
    # Half were URI events: their entries keep the URI (a bank audit fetches it), the others have none.
    decisions = [ReviewDecision(event_id=f"d-{i}", content_sha256=sha, label="real" if i % 2 else "ai_generated",
                                reviewer="bob", image_uri=f"https://images.example/{i}.png" if i % 4 < 2 else None)
                 for i, sha in enumerate(shas)]
    sent = _send_decisions(topics, decisions)
    doomed = ApplyProcess(env, tmp_path, "doomed")
    try:
        deadline = time.monotonic() + 90
        while len(read_outcomes(topics).verdicts) < 20:
            assert time.monotonic() < deadline, doomed.log_path.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        doomed.kill()
    assert missing(sent, read_outcomes(topics)), "the consumer finished before it was killed"
    restarted = ApplyProcess(env, tmp_path, "restarted")
    try:
        outcomes = wait_for_outcomes(topics, sent, timeout=120)
        time.sleep(1.0)  # the last commit
    finally:
        assert restarted.stop() == 0
    assert {v["event_id"] for v in outcomes.verdicts} == {d.event_id for d in decisions}  # duplicates allowed
    assert all(v["decided_by"] == "review" for v in outcomes.verdicts)
    banks = BankStore(load_settings(banks={"key_prefix": f"{topics.prefix}:banks"},
                                    redis={"url": f"redis://{redis_service.address}/0"}))
    try:
        banks.refresh()
        for decision in decisions:
            bank = "review-ai" if decision.label == "ai_generated" else "review-real"
            match = banks.match(decision.content_sha256, None, [bank])
            assert match is not None and match.label == decision.label, decision.event_id
        sources = {e.sha256: e.source for bank in ("review-ai", "review-real") for e in banks.entries(bank)}
        assert sources == {d.content_sha256: d.image_uri for d in decisions}
    finally:
        banks.close()
    committed = streamio.committed_offsets({"bootstrap_servers": topics.bootstrap},
                                           f"{topics.prefix}.review-group", topics.decisions)
    # Everything committed, to the last decision sent (Tansu's end offsets can fall short: count from `sent`).
    assert committed == streamio.partition_ends(sent)
