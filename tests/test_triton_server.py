"""A real tritonserver (from the nvidia-pytriton wheel) started by the dev-stack code, on CPU, serving one
Python-backend model, called with tritonclient over gRPC and HTTP."""

from __future__ import annotations

import importlib.util
import os
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient  # the dev extra, installed by `make`: missing means a broken set-up
import tritonclient.http as httpclient

from streamguard.devstack import ServiceError, TritonService, start_triton, triton_paths

MODEL = "image_mean"

CONFIG = f"""\
name: "{MODEL}"
backend: "python"
max_batch_size: 8
input [{{ name: "IMAGES", data_type: TYPE_FP32, dims: [3, 32, 32] }}]
output [{{ name: "MEAN", data_type: TYPE_FP32, dims: [1] }}]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [{{ kind: KIND_CPU, count: 1 }}]
"""

MODEL_PY = '''\
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # The test reads this line to check the model runs in the test's environment (its numpy, its prefix).
        pb_utils.Logger.log_info(f"stub-env numpy={np.__version__} prefix={sys.prefix}")

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGES").as_numpy()
            mean = images.reshape(images.shape[0], -1).mean(axis=1, keepdims=True).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("MEAN", mean)]))
        return responses
'''


def _repository(root: Path) -> Path:
    (root / MODEL / "1").mkdir(parents=True)
    (root / MODEL / "config.pbtxt").write_text(CONFIG)
    (root / MODEL / "1" / "model.py").write_text(textwrap.dedent(MODEL_PY))
    return root


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return response.status, response.read().decode()


def _process_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return sorted(found)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonService]:
    root = tmp_path_factory.mktemp("triton")
    started = time.monotonic()
    service = start_triton(root / "work", _repository(root / "models"), [MODEL], timeout_s=60)
    service.start_seconds = time.monotonic() - started  # type: ignore[attr-defined]
    try:
        yield service
    finally:
        service.stop()


def test_triton_paths_point_into_the_wheel() -> None:
    paths = triton_paths()
    assert os.access(paths.binary, os.X_OK) and os.access(paths.stub, os.X_OK)
    assert (paths.backends / "python" / "libtriton_python.so").is_file()
    assert any(paths.libs.glob("libtritonserver*.so"))
    with pytest.raises(ServiceError, match="Python 2.7 backend stub"):
        triton_paths("2.7")


def test_grpc_and_http_inference_match_numpy(triton: TritonService) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((5, 3, 32, 32), dtype=np.float32)
    expected = images.reshape(5, -1).mean(axis=1)

    client = grpcclient.InferenceServerClient(triton.grpc_address)
    try:
        assert client.is_server_ready() and client.is_model_ready(MODEL)
        tensor = grpcclient.InferInput("IMAGES", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        result = client.infer(MODEL, [tensor], outputs=[grpcclient.InferRequestedOutput("MEAN")])
        out = result.as_numpy("MEAN")
    finally:
        client.close()
    assert out.shape == (5, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], expected, rtol=1e-5)

    client = httpclient.InferenceServerClient(f"127.0.0.1:{triton.port}")
    try:
        tensor = httpclient.InferInput("IMAGES", [2, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(images[:2])
        out = client.infer(MODEL, [tensor]).as_numpy("MEAN")
    finally:
        client.close()
    np.testing.assert_allclose(out[:, 0], expected[:2], rtol=1e-5)


def test_health_metrics_and_model_environment(triton: TritonService) -> None:
    assert _get(f"{triton.http_url}/v2/health/live")[0] == 200
    assert _get(f"{triton.http_url}/v2/models/{MODEL}/ready")[0] == 200
    client = grpcclient.InferenceServerClient(triton.grpc_address)
    try:
        tensor = grpcclient.InferInput("IMAGES", [1, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 3, 32, 32), np.float32))
        client.infer(MODEL, [tensor])
    finally:
        client.close()
    status, text = _get(triton.metrics_url)
    counts = [line for line in text.splitlines() if line.startswith("nv_inference_count{")]
    assert status == 200 and any(f'model="{MODEL}"' in line and float(line.split()[-1]) >= 1 for line in counts)
    # The stub ran this environment's interpreter (its numpy<2), not the system's or pyenv's global one.
    log_text = Path(triton.log_path).read_text()
    assert f"stub-env numpy={np.__version__} " in log_text, log_text[-2000:]
    print(f"triton ready in {triton.start_seconds:.2f}s")  # type: ignore[attr-defined]


def test_stop_ends_server_and_stub(tmp_path: Path) -> None:
    service = start_triton(tmp_path / "work", _repository(tmp_path / "models"), [MODEL], timeout_s=60)
    group = _process_group(service.pid)
    assert service.pid in group and len(group) >= 2, group  # the server and its Python-backend stub
    started = time.monotonic()
    service.stop()
    assert not service.alive()
    assert _process_group(service.pid) == []
    assert time.monotonic() - started < 10


def test_a_second_server_in_the_same_workdir_reuses_the_backends(triton: TritonService, tmp_path: Path) -> None:
    workdir = Path(triton.log_path).parent
    before = sorted(p.name for p in (workdir / "tritonserver-backends").iterdir())
    second = start_triton(workdir, _repository(tmp_path / "models"), [MODEL], timeout_s=60)
    try:
        assert triton.alive() and second.alive()
        assert sorted(p.name for p in (workdir / "tritonserver-backends").iterdir()) == before  # nothing rewritten under the first
        assert _get(f"{second.http_url}/v2/models/{MODEL}/ready")[0] == 200
    finally:
        second.stop()
    assert triton.alive()


def test_a_missing_model_fails_fast_with_the_servers_reason(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ServiceError, match="exited at start") as info:
        start_triton(tmp_path / "work", _repository(tmp_path / "models"), ["no_such_model"], timeout_s=60)
    assert "no_such_model" in str(info.value)  # the log's tail travels in the message
    assert time.monotonic() - started < 15


def test_no_wheel_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else find_spec(name, *a))
    with pytest.raises(ServiceError, match="install the dev extra"):
        triton_paths()
