"""Triton killed and restarted under a running worker: the worker holds and pauses, reports not-ready,
publishes no error scores, resumes when Triton is back, and every event ends with a verdict or a dead
letter; afterwards everything is committed."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from images import encode, noise
from stack import (
    Topics,
    WorkerProcess,
    committed_offsets,
    image_events,
    missing,
    produce,
    read_outcomes,
    wait_for_outcomes,
    worker_env,
)

from streamguard.devstack import Service, start_triton
from streamguard.triton.build import build_repository

MODEL = "univfd"


def _get(port: int, path: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in worker metrics")


def _outages(worker: WorkerProcess) -> list[dict]:
    return [e for e in worker.events() if e.get("event") == "worker.outage_started"]


def test_worker_survives_a_triton_restart(kafka: Service, tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "models", device="cpu", models=[MODEL]).repository
    triton = start_triton(tmp_path / "triton-1", repository, [MODEL])
    ports = {"http_port": triton.port, "grpc_port": triton.grpc_port, "metrics_port": triton.metrics_port}
    topics = Topics(kafka.address).create()
    env = worker_env(
        topics, None,
        # univfd alone: the other CLIP detectors would only add CPU time here.
        STREAMGUARD_PLUGINS__DENY='["builtin-pinclip", "builtin-mpft"]',
        STREAMGUARD_DETECTORS__BACKEND="triton",
        STREAMGUARD_TRITON__URL=triton.grpc_address,
        STREAMGUARD_TRITON__RETRY_BUDGET_S="2",
        STREAMGUARD_TRITON__BREAKER_RESET_S="1",
        STREAMGUARD_WORKER__OUTAGE_CHECK_S="0.3",
        # A CLIP pass on a loaded 2-core machine can outlast the 10 s default: that would be a false outage.
        STREAMGUARD_TRITON__REQUEST_TIMEOUT_S="40",
        STREAMGUARD_DETECTORS__TIMEOUT_S="60",
    )
    worker = WorkerProcess(env, tmp_path)
    restarted = None
    try:
        images = [encode(noise((96, 80), seed=i), "JPEG") for i in range(36)]
        images[5] = images[17] = b"\xff\xd8 not really a jpeg"
        sent = produce(topics, image_events(images, prefix="outage"))

        # Let part of the stream through, then take Triton away mid-stream.
        deadline = time.monotonic() + 90
        while len(read_outcomes(topics).verdicts) < 4:
            assert time.monotonic() < deadline, "no verdicts before the outage"
            time.sleep(0.2)
        assert not _outages(worker), "an outage before Triton was stopped"
        triton.stop(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not _outages(worker):
            assert time.monotonic() < deadline and worker.proc.poll() is None, "the worker never noticed"
            time.sleep(0.2)

        # While held: not ready, every partition paused, still alive, and nothing more published.
        deadline = time.monotonic() + 10
        while True:
            metrics = _get(worker.health_port, "/metrics")[1]
            if _metric(metrics, "streamguard_paused_partitions") == 4.0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert _metric(metrics, "streamguard_detector_outage") == 1.0
        assert _metric(metrics, "streamguard_paused_partitions") == 4.0
        status, body = _get(worker.health_port, "/readyz")
        assert status == 503 and json.loads(body)["outage"], body
        before = len(read_outcomes(topics).verdicts)
        time.sleep(2.0)  # several outage checks
        held = read_outcomes(topics)
        assert len(held.verdicts) == before
        assert missing(sent, held), "the outage came after the whole stream was judged: nothing was tested"
        alive_status, _ = _get(worker.health_port, "/healthz")
        assert alive_status == 200  # holding is not hanging: the pod must not be restarted for it

        restarted = start_triton(tmp_path / "triton-2", repository, [MODEL], **ports)
        outcomes = wait_for_outcomes(topics, sent, timeout=180)
        worker.wait_for_event("worker.outage_ended", timeout=30)
        assert _get(worker.health_port, "/readyz")[0] == 200
    finally:
        worker.signal(signal.SIGTERM)
        code = worker.wait(60)
        for server in (triton, restarted):
            if server is not None:
                server.stop()
    assert code == 0

    assert len(outcomes.dead_letters) == 2
    assert {d["error_type"] for d in outcomes.dead_letters} <= {"CorruptImage", "UnsupportedFormat"}
    ids = outcomes.verdict_ids()
    assert len(ids) == len(set(ids)) == 34
    for verdict in outcomes.verdicts:
        univfd = next(s for s in verdict["scores"] if s["detector"] == MODEL)
        assert univfd["error"] is None and univfd["probability"] is not None, univfd
    # Everything committed, to just past the last record sent (Tansu's own end offsets can lag: not used).
    last: dict[int, int] = {}
    for record in sent:
        last[record.partition] = max(last.get(record.partition, -1), record.offset)
    assert committed_offsets(topics) == {p: offset + 1 for p, offset in last.items()}
