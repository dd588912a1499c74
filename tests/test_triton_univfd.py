"""The univfd Triton repository built by `streamguard triton build`, served by a real tritonserver on CPU:
its logits match the in-process model, its version is readable by a client, and concurrent requests are
batched by the dynamic batcher (mean batch size above 1 from the metrics endpoint)."""

from __future__ import annotations

import io
import queue
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image

from streamguard.backbone import load_backbone
from streamguard.builtin.cliphead.model import build_served
from streamguard.builtin.univfd.plugin import DETECTOR as UNIVFD, WEIGHTS_DIR
from streamguard.config import BackboneSettings, IntakeSettings
from streamguard.devstack import TritonService, start_triton
from streamguard.intake import decode_image, prepare
from streamguard.intake.contract import InputContract
from streamguard.triton.build import build_repository

MODEL = "univfd"


def _images() -> np.ndarray:
    """Three CLIP-prepared images of different sizes and content, through the worker's intake code."""
    rng = np.random.default_rng(7)
    out = []
    for i, (w, h) in enumerate([(320, 240), (224, 224), (200, 300)]):
        base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if i != 1 else np.full((h, w, 3), 90, np.uint8)
        if i == 2:
            base[:, : w // 2] = (20, 160, 40)
        buf = io.BytesIO()
        Image.fromarray(base).save(buf, format="PNG" if i != 0 else "JPEG")
        out.append(prepare(decode_image(buf.getvalue(), IntakeSettings()), InputContract(224)))
    return np.stack(out).astype(np.float32)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{MODEL}"' in line:
            return float(line.split()[-1])
    raise AssertionError(f"no {name} for {MODEL} in metrics")


def _metrics(service: TritonService) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(service.metrics_url, timeout=5) as response:
        return response.read().decode()


def _settled_counts(service: TritonService) -> tuple[float, float]:
    """Inference and execution counts once they stop moving: an earlier test's requests can be counted
    after their responses went out."""
    def counts() -> tuple[float, float]:
        text = _metrics(service)
        return _metric(text, "nv_inference_count"), _metric(text, "nv_inference_exec_count")

    previous = counts()
    for _ in range(20):
        time.sleep(0.5)
        current = counts()
        if current == previous:
            return current
        previous = current
    return previous


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonService]:
    root = tmp_path_factory.mktemp("triton-univfd")
    result = build_repository(root / "models", device="cpu", models=[MODEL])
    assert result.models == {MODEL: UNIVFD.version(WEIGHTS_DIR)}
    started = time.monotonic()
    service = start_triton(root / "work", result.repository, [MODEL], timeout_s=120)
    print(f"univfd on triton ready in {time.monotonic() - started:.1f}s")
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def expected() -> tuple[np.ndarray, np.ndarray]:
    pixels = _images()
    model = build_served(UNIVFD, load_backbone(BackboneSettings(), "cpu"), WEIGHTS_DIR).eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(pixels)).numpy()
    return pixels, logits


def test_build_fills_parameters_and_device(tmp_path: Path) -> None:
    result = build_repository(tmp_path, device="gpu", backbone=BackboneSettings(cache_dir=tmp_path / "cache"),
                              models=[MODEL])
    config = (tmp_path / MODEL / "config.pbtxt").read_text()
    assert "KIND_GPU" in config and "KIND_CPU" not in config
    assert f'string_value: "{WEIGHTS_DIR.resolve()}"' in config
    assert f'string_value: "{(tmp_path / "cache").resolve()}"' in config
    assert f'string_value: "{result.models[MODEL]}"' in config
    assert (tmp_path / MODEL / "1" / "model.py").is_file()


def test_logits_match_in_process_model(triton: TritonService, expected: tuple[np.ndarray, np.ndarray]) -> None:
    pixels, logits = expected
    client = grpcclient.InferenceServerClient(triton.grpc_address)
    try:
        assert client.is_model_ready(MODEL)
        config = client.get_model_config(MODEL, as_json=True)["config"]
        assert config["parameters"]["streamguard_version"]["string_value"] == UNIVFD.version(WEIGHTS_DIR)
        assert client.get_model_metadata(MODEL, as_json=True)["versions"] == ["1"]
        # What the server parsed, not the file (REJECT is the enum default: JSON leaves it out).
        policy = config["dynamic_batching"]["default_queue_policy"]
        assert policy.get("timeout_action", "REJECT") == "REJECT" and policy["allow_timeout_override"] is True
        assert int(policy["default_timeout_microseconds"]) == 30_000_000 and int(policy["max_queue_size"]) == 256
        assert int(config["max_batch_size"]) == 32 and config["model_warmup"][0]["batch_size"] == 1
        tensor = grpcclient.InferInput("PIXELS", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        started = time.monotonic()
        out = client.infer(MODEL, [tensor], outputs=[grpcclient.InferRequestedOutput("LOGITS")]).as_numpy("LOGITS")
        print(f"batch of 3 in {time.monotonic() - started:.2f}s; logits {out[:, 0]} vs {logits}")
    finally:
        client.close()
    assert out.shape == (3, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], logits, atol=1e-3, rtol=0)


def test_concurrent_requests_are_batched(triton: TritonService, expected: tuple[np.ndarray, np.ndarray]) -> None:
    pixels, logits = expected
    n = 16  # batch-1 requests all in flight at once (async gRPC client), as the worker sends them
    count0, exec0 = _settled_counts(triton)
    done: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_address)
    try:
        started = time.monotonic()
        for i in range(n):
            tensor = grpcclient.InferInput("PIXELS", [1, 3, 224, 224], "FP32")
            tensor.set_data_from_numpy(pixels[i % 3 : i % 3 + 1])
            client.async_infer(MODEL, [tensor], callback=lambda result, error, i=i: done.put((i, result, error)),
                               request_id=str(i), timeout=60_000_000)
        results = [done.get(timeout=120) for _ in range(n)]
        elapsed = time.monotonic() - started
    finally:
        client.close()
    for i, result, error in results:
        assert error is None, f"request {i}: {error}"
        np.testing.assert_allclose(result.as_numpy("LOGITS")[:, 0], logits[i % 3 : i % 3 + 1], atol=1e-3, rtol=0)
    # Triton updates its counters after the responses go out: read until all requests are counted.
    deadline = time.monotonic() + 10
    while True:
        after = _metrics(triton)
        count = _metric(after, "nv_inference_count") - count0
        execs = _metric(after, "nv_inference_exec_count") - exec0
        if count >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(f"{n} concurrent requests in {elapsed:.2f}s: {count:g} inferences in {execs:g} executions")
    assert count == n
    assert count / execs > 1
