"""Triton load spreading: one worker backend, one configured target, several real tritonservers.

Two servers on loopback serve the same tiny Python-backend model on the same gRPC port, one on 127.0.0.1 and
one on 127.0.0.2 (both loopback on Linux), as two Triton pods behind a headless Service share a port. The
worker's Triton backend is given one target naming both: a list of addresses, or a dns:/// name that a DNS
server made here resolves to both addresses. Each server's own statistics (the model statistics API,
inference_count) must show a share of the requests: gRPC's default policy, pick_first, would send them all
to one server. A target whose second address is down still answers every request from the first.
"""

from __future__ import annotations

import io
import socket
import struct
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from streamguard.backends.triton_grpc import TritonBackend, channel_args
from streamguard.config import IntakeSettings, TritonSettings, load_settings
from streamguard.detectors.spec import DetectorInput
from streamguard.devstack import TritonService, start_triton
from streamguard.intake import decode_image

MODEL = "tiny_mean"
VERSION = "tiny-1"
SIZE = 8

CONFIG = f"""\
name: "{MODEL}"
backend: "python"
max_batch_size: 8
input [{{ name: "PIXELS", data_type: TYPE_FP32, dims: [3, {SIZE}, {SIZE}] }}]
output [{{ name: "LOGITS", data_type: TYPE_FP32, dims: [1] }}]
parameters {{ key: "streamguard_version" value {{ string_value: "{VERSION}" }} }}
instance_group [{{ kind: KIND_CPU, count: 1 }}]
"""

MODEL_PY = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy()
            logits = pixels.reshape(pixels.shape[0], -1).mean(axis=1, keepdims=True).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("LOGITS", logits)]))
        return responses
"""


def tiny_repository(root: Path) -> Path:
    """A model repository with one small Python-backend model that speaks the detectors' protocol (PIXELS in,
    LOGITS out: the mean pixel) and declares its streamguard_version."""
    (root / MODEL / "1").mkdir(parents=True, exist_ok=True)
    (root / MODEL / "config.pbtxt").write_text(CONFIG)
    (root / MODEL / "1" / "model.py").write_text(textwrap.dedent(MODEL_PY))
    return root


def inputs(n: int, seed: int = 0) -> list[DetectorInput]:
    """``n`` prepared inputs with distinct pixels (and a real decoded image each, as the runner passes)."""
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (10, 20, 30)).save(buf, format="PNG")
    image = decode_image(buf.getvalue(), IntakeSettings())
    rng = np.random.default_rng(seed)
    return [DetectorInput(pixels=rng.random((3, SIZE, SIZE), dtype=np.float32), image=image) for _ in range(n)]


def expected(batch: list[DetectorInput]) -> list[float]:
    return [float(item.pixels.mean()) for item in batch]  # type: ignore[union-attr]


def inference_count(service: TritonService) -> int:
    """Images this server has run the model on, from its own statistics API."""
    client = httpclient.InferenceServerClient(service.http_url.removeprefix("http://"))
    try:
        stats = client.get_inference_statistics(MODEL)
    finally:
        client.close()
    return int(stats["model_stats"][0]["inference_count"])


class LoopbackDns:
    """A DNS server on UDP loopback: A queries for the names it knows get every address listed (as a headless
    Service's name gets one per ready pod), AAAA queries an empty answer, other names NXDOMAIN."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = {name.lower().rstrip("."): addresses for name, addresses in records.items()}
        self.queries: list[tuple[str, int]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, name="loopback-dns", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._sock.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self._sock.recvfrom(512)
            except OSError:
                return
            try:
                self._sock.sendto(self._answer(query), peer)
            except (OSError, IndexError, struct.error):
                continue

    def _answer(self, query: bytes) -> bytes:
        ident = struct.unpack(">H", query[:2])[0]
        pos, labels = 12, []
        while query[pos]:
            labels.append(query[pos + 1:pos + 1 + query[pos]].decode("ascii"))
            pos += 1 + query[pos]
        qtype = struct.unpack(">H", query[pos + 1:pos + 3])[0]
        question = query[12:pos + 5]
        name = ".".join(labels).lower()
        self.queries.append((name, qtype))
        addresses = self.records.get(name)
        answers = [
            # A pointer to the question's name, type A, class IN, TTL 5 s, 4 bytes of address.
            b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + socket.inet_aton(address)
            for address in (addresses if addresses and qtype == 1 else [])
        ]
        flags = 0x8180 | (0 if addresses is not None else 3)  # a response, recursion available; NXDOMAIN
        return struct.pack(">HHHHHH", ident, flags, 1, len(answers), 0, 0) + question + b"".join(answers)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonService, TritonService]]:
    root = tmp_path_factory.mktemp("triton-spread")
    repository = tiny_repository(root / "models")
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not a loopback address here")
    first = start_triton(root / "a", repository, [MODEL], timeout_s=60)
    try:
        second = start_triton(root / "b", repository, [MODEL], timeout_s=60, grpc_host="127.0.0.2",
                              grpc_port=first.grpc_port)
    except BaseException:
        first.stop()
        raise
    try:
        yield first, second
    finally:
        second.stop()
        first.stop()


def _spread(url: str, servers: tuple[TritonService, ...], batches: int = 30, per_batch: int = 4) -> list[int]:
    """Send ``batches`` predict calls through one backend; returns each server's share of the images."""
    before = [inference_count(s) for s in servers]
    settings = TritonSettings(url=url, request_batch_size=1, request_timeout_s=20, retry_budget_s=10)
    backend = TritonBackend(MODEL, settings, expected_version=VERSION)
    try:
        assert backend.ready()
        for seed in range(batches):
            batch = inputs(per_batch, seed)
            assert backend.predict(batch) == pytest.approx(expected(batch), rel=1e-5)
    finally:
        backend.close()
    return [inference_count(s) - b for s, b in zip(servers, before, strict=True)]


def test_the_channel_balances_round_robin() -> None:
    args = dict(channel_args())
    assert '"round_robin"' in args["grpc.service_config"]


def test_a_list_of_addresses_spreads_requests_over_both_servers(pair: tuple[TritonService, TritonService]) -> None:
    first, second = pair
    assert first.grpc_port == second.grpc_port and first.grpc_host != second.grpc_host
    url = f"{first.grpc_address},{second.grpc_address}"
    assert TritonSettings(url=url).grpc_target() == f"ipv4:{url}"
    shares = _spread(url, pair)
    assert sum(shares) == 120
    # Round robin over two ready servers: about half each; pick_first would give one of them 0.
    assert min(shares) >= 30, shares


def test_a_dns_name_spreads_requests_over_every_address_it_resolves_to(
        pair: tuple[TritonService, TritonService]) -> None:
    first, second = pair
    dns = LoopbackDns({"triton-headless.streamguard.test": [first.grpc_host, second.grpc_host]})
    try:
        # dns://<dns server>/<name>:<port>: the authority names the DNS server to ask, here ours on loopback;
        # in a cluster it is dns:///triton-headless.<namespace>.svc:8001, asking the cluster's DNS.
        url = f"dns://127.0.0.1:{dns.port}/triton-headless.streamguard.test:{first.grpc_port}"
        shares = _spread(url, pair)
    finally:
        dns.close()
    assert ("triton-headless.streamguard.test", 1) in dns.queries  # the name was resolved by our DNS server
    assert sum(shares) == 120
    assert min(shares) >= 30, shares


def test_an_address_that_is_down_is_skipped(pair: tuple[TritonService, TritonService]) -> None:
    first, _ = pair
    # 127.0.0.3 has nothing listening: a pod that went away. Every request is answered by the live one,
    # with no retry budget spent on the dead address.
    shares = _spread(f"{first.grpc_address},127.0.0.3:{first.grpc_port}", (first,), batches=10)
    assert shares == [40]


def test_the_url_is_configured_like_any_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_TRITON__URL", "dns:///triton-headless.ml.svc.cluster.local:8001")
    assert load_settings().triton.grpc_target() == "dns:///triton-headless.ml.svc.cluster.local:8001"
