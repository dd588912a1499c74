"""`streamguard rescore --bank` against the real broker and Redis: a bank audit judges the banked images again
and routes those the models now label otherwise to review, never a verdict; entries banked through
`review apply` keep their image's URI for it, imported hashes are counted, and a killed audit carries on
without skipping an entry."""

from __future__ import annotations

import hashlib
import http.server
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from images import encode, solid
from stack import Topics, WorkerProcess, produce, read_outcomes, wait_for_outcomes, worker_env
from streamguard import streamio
from streamguard.banks import BankEntry, BankStore
from streamguard.cli import cli
from streamguard.config import load_settings
from streamguard.devstack import Service, create_topics
from streamguard.schemas import ImageEvent, ReviewDecision, ReviewRequest
from streamguard.streamio import TopicReader, event_message

HOST = "127.0.0.1"


def bright(level: int) -> bytes:
    """Under the test policy (0.99 / 0.5) the test detector calls a gray of 250 and up ai_generated."""
    assert level >= 250
    return encode(solid(level), "PNG")


def dark(level: int) -> bytes:
    """...and a gray below 120 real."""
    assert level < 120
    return encode(solid(level), "PNG")


class _Images(http.server.BaseHTTPRequestHandler):
    images: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        data = self.images.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args: object) -> None:
        return None


@dataclass
class Server:
    base: str
    images: dict[str, bytes]

    def put(self, name: str, data: bytes) -> str:
        self.images[f"/{name}"] = data
        return f"{self.base}/{name}"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    images: dict[str, bytes] = {}
    handler = type("Handler", (_Images,), {"images": images})
    httpd = http.server.ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Server(f"http://{HOST}:{httpd.server_address[1]}", images)
    httpd.shutdown()
    httpd.server_close()


@dataclass
class Stack:
    topics: Topics
    redis_url: str

    @property
    def review(self) -> str:
        return f"{self.topics.prefix}.review"

    @property
    def decisions(self) -> str:
        return f"{self.topics.prefix}.decisions"

    @property
    def bank_prefix(self) -> str:
        return f"{self.topics.prefix}:banks"

    def env(self, **extra: str) -> dict[str, str]:
        return worker_env(self.topics, self.redis_url, **{
            "STREAMGUARD_REVIEW__TOPIC": self.review,
            "STREAMGUARD_REVIEW__DECISIONS_TOPIC": self.decisions,
            "STREAMGUARD_REVIEW__GROUP_ID": f"{self.topics.prefix}.review-group",
            # Every label to review: the test decides some of them against the models.
            "STREAMGUARD_REVIEW__LABELS": '["uncertain", "ai_generated", "real"]',
            "STREAMGUARD_BANKS__KEY_PREFIX": self.bank_prefix,
            "STREAMGUARD_FETCH__ALLOW_NETWORKS": f'["{HOST}/32"]',
            **extra,
        })

    def store(self) -> BankStore:
        return BankStore(load_settings(banks={"key_prefix": self.bank_prefix}, redis={"url": self.redis_url}))

    def topic(self, name: str) -> str:
        topic = f"{self.topics.prefix}.{name}"
        create_topics(self.topics.bootstrap, {topic: 2})
        return topic


@pytest.fixture(scope="module")
def stack(kafka: Service, redis_service: Service) -> Stack:
    topics = Topics(kafka.address).create()
    made = Stack(topics, f"redis://{redis_service.address}/0")
    create_topics(topics.bootstrap, {made.review: 2, made.decisions: 2})
    return made


def _records(bootstrap: str, topic: str) -> list[dict]:
    with TopicReader({"bootstrap_servers": bootstrap}, [topic], wait_s=10) as reader:
        return [json.loads(r.value) for r in reader.records(idle_s=1.0)]


def _wait_records(bootstrap: str, topic: str, count: int, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while len(found := _records(bootstrap, topic)) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} records on {topic}"
        time.sleep(0.3)
    return found


def _invoke(stack: Stack, monkeypatch: pytest.MonkeyPatch, *args: str, **extra: str) -> tuple[int, dict, str]:
    for name, value in stack.env(**extra).items():
        if name.startswith("STREAMGUARD_"):
            monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli, ["rescore", "--no-progress", *args])
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return result.exit_code, summary, result.output if result.exit_code else result.stdout


def _disagreements(stack: Stack, topic: str) -> list[ReviewRequest]:
    return [ReviewRequest.model_validate(r) for r in _records(stack.topics.bootstrap, topic)
            if r["reason"] == "bank_disagreement"]


def test_a_bank_audit_routes_the_entries_the_models_now_contradict(
        stack: Stack, server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The worker judges three URI events; reviewers decide all of them "real", one against the models.
    images = {"wrong": bright(253), "right": dark(40), "also-right": dark(80)}
    uris = {name: server.put(f"{uuid.uuid4().hex}.png", data) for name, data in images.items()}
    env = stack.env()
    worker = WorkerProcess(env, tmp_path)
    try:
        events = [ImageEvent(event_id=name, uri=uri) for name, uri in uris.items()]  # type: ignore[arg-type]
        sent = produce(stack.topics, [event_message(event, "json") for event in events])
        verdicts = {v["event_id"]: v for v in wait_for_outcomes(stack.topics, sent).verdicts}
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    assert {name: v["label"] for name, v in verdicts.items()} == {
        "wrong": "ai_generated", "right": "real", "also-right": "real"}
    requests = [ReviewRequest.model_validate(r) for r in _wait_records(stack.topics.bootstrap, stack.review, 3)]
    assert {r.event_id: r.image_uri for r in requests} == uris
    decisions = [ReviewDecision(event_id=r.event_id, content_sha256=r.content_sha256, label="real",
                                reviewer="carol", pdq=r.pdq, pdq_quality=r.pdq_quality, image_uri=r.image_uri)
                 for r in requests]
    streamio.produce({"bootstrap_servers": stack.topics.bootstrap}, stack.decisions,
                     [(d.event_id, d.model_dump_json().encode(), []) for d in decisions])
    applier = subprocess.Popen([sys.executable, "-m", "streamguard", "review", "apply"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        overrides = _wait_review_verdicts(stack, 3)
    finally:
        applier.send_signal(signal.SIGTERM)
        assert applier.wait(60) == 0
    assert {v["event_id"] for v in overrides} == set(images)

    store = stack.store()
    try:
        entries = list(store.entries("review-real"))
        # The entries a decision banked carry the image's URI; an imported hash (no image) joins them.
        assert {e.sha256: e.source for e in entries} == {
            hashlib.sha256(images[name]).hexdigest(): uri for name, uri in uris.items()}
        imported = hashlib.sha256(b"an imported signal").hexdigest()
        store.add_many([BankEntry("review-real", "real", imported, None, note="from a list")])
    finally:
        store.close()
    before = len(read_outcomes(stack.topics).verdicts)

    state = ["--state-dir", str(tmp_path / "state")]
    code, dry, log = _invoke(stack, monkeypatch, "--bank", "review-real", "--dry-run", *state)
    assert code == 0, log
    (printed,) = [json.loads(line) for line in log.splitlines()[:-1]]
    assert (printed["content_sha256"], printed["bank_label"], printed["model_label"], printed["image_uri"]) == (
        hashlib.sha256(images["wrong"]).hexdigest(), "real", "ai_generated", uris["wrong"])
    assert _disagreements(stack, stack.review) == []

    code, summary, log = _invoke(stack, monkeypatch, "--bank", "review-real", *state)
    assert code == 0 and summary["done"], log
    assert {k: summary["all_runs"].get(k) for k in ("read", "judged", "agree", "disagree", "no_image")} == {
        "read": 4, "judged": 3, "agree": 2, "disagree": 1, "no_image": 1}
    (routed,) = _disagreements(stack, stack.review)
    assert (routed.content_sha256, routed.bank, routed.bank_label, routed.label, routed.image_uri) == (
        hashlib.sha256(images["wrong"]).hexdigest(), "review-real", "real", "ai_generated", uris["wrong"])
    assert routed.probability is not None and routed.probability >= 0.99 and routed.scores
    assert routed.explanation is not None and routed.explanation.evidence[0].name == "review-real"
    assert routed.pdq is not None  # a decision on it banks the same near-match hash
    # The bank stays authoritative until a person decides: no verdict was published.
    assert len(read_outcomes(stack.topics).verdicts) == before

    # Local files matched to the bank instead of fetched: the same disagreement, named by its path.
    data = tmp_path / "data"
    data.mkdir()
    for name, image in images.items():
        (data / f"{name}.png").write_bytes(image)
    (data / "unbanked.png").write_bytes(bright(251))
    code, summary, log = _invoke(stack, monkeypatch, "--bank", "review-real", "--data", str(data), "--dry-run",
                                 *state)
    assert code == 0, log
    (printed,) = [json.loads(line) for line in log.splitlines()[:-1]]
    assert (printed["model_label"], printed["path"]) == ("ai_generated", str((data / "wrong.png").resolve()))
    assert summary["this_run"]["not_in_bank"] == 1 and summary["this_run"]["agree"] == 2


def _wait_review_verdicts(stack: Stack, count: int, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while len(found := [v for v in read_outcomes(stack.topics).verdicts if v["decided_by"] == "review"]) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} decisions applied"
        time.sleep(0.3)
    return found


def _checkpointed(state: Path) -> int:
    if not state.exists():
        return 0
    saved = json.loads(state.read_text())
    return sum(next_ - saved["start_cursors"][name][0] for name, (next_, _) in saved["cursors"].items())


def test_a_bank_audit_killed_mid_bank_carries_on_without_skipping(stack: Stack, server: Server,
                                                                  tmp_path: Path) -> None:
    bank = f"audit-{uuid.uuid4().hex[:6]}"
    grays = [*range(250, 256), *range(10, 100, 5)]  # 6 the models call ai_generated, 18 real
    entries = []
    for level in grays:
        image = encode(solid(level), "PNG")
        entries.append(BankEntry(bank, "real", hashlib.sha256(image).hexdigest(), None,
                                 source=server.put(f"{bank}-{level}.png", image)))
    store = stack.store()
    try:
        assert store.add_many(entries) == len(entries)
        # Another bank's entries between them: the cursor runs over ids every bank shares.
        store.add_many([BankEntry("interleaved", "ai_generated", hashlib.sha256(b"x").hexdigest(), None)])
    finally:
        store.close()
    expected = {e.sha256 for e, level in zip(entries, grays, strict=True) if level >= 250}
    out = stack.topic(f"review-{bank}")
    state = tmp_path / "state.json"
    chunk = 4
    env = stack.env(STREAMGUARD_DETECTORS__OPTIONS='{"brightness": {"delay_s": 0.25}}')
    command = [sys.executable, "-m", "streamguard", "rescore", "--no-progress", "--bank", bank, "--review-topic",
               out, "--state", str(state), "--chunk-size", str(chunk)]
    log = tmp_path / "doomed.log"
    with open(log, "wb") as sink:
        doomed = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while _checkpointed(state) < chunk:
            assert doomed.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        doomed.kill()
        doomed.wait(10)
    assert not json.loads(state.read_text())["done"], "the audit finished before it was killed"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["done"] and summary["this_run"]["read"] < len(entries)  # it carried on
    assert summary["all_runs"]["read"] == len(entries)  # checkpointed chunks count once
    assert summary["all_runs"]["disagree"] == len(expected)

    routed = _disagreements(stack, out)
    assert {r.content_sha256 for r in routed} == expected  # every disagreement at least once, nothing else
    assert len(routed) - len(expected) <= chunk  # at most the interrupted chunk's, again
    assert all(r.bank == bank and r.bank_label == "real" and r.label == "ai_generated" for r in routed)
