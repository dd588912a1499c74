"""The Triton detector backend against a real tritonserver serving the univfd repository that
`streamguard triton build` makes: the same probabilities as in-process through the whole `Scorer`, the
version check, the split between "Triton is away" (an outage, retried) and "this request is wrong" (an
error score), the per-model breaker, and backend selection by configuration alone."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from streamguard.backends.torch_inprocess import TorchBackend
from streamguard.backends.triton_grpc import TritonBackend, VersionMismatch
from streamguard.config import DetectorSettings, IntakeSettings, TritonSettings, load_settings
from streamguard.detectors.runner import DetectorRunner, DetectorUnavailable
from streamguard.detectors.spec import BackendUnavailable, DetectorInput, DetectorSpec
from streamguard.devstack import TritonService, free_port, start_triton
from streamguard.intake import decode_image
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer
from streamguard.triton.build import build_repository

MODEL = "univfd"


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonService]:
    root = tmp_path_factory.mktemp("triton-backend")
    # Every built-in detector with weights: the parity test covers each one's served model.
    result = build_repository(root / "models", device="cpu")
    service = start_triton(root / "work", result.repository, list(result.models), timeout_s=180)
    try:
        yield service
    finally:
        service.stop()


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[: size[1] // 2] //= 3  # some structure, so the two halves differ
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _scorer(monkeypatch: pytest.MonkeyPatch, **env: str) -> Scorer:
    monkeypatch.setenv("STREAMGUARD_PLUGINS__DENY", "[]")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    settings.plugins.allow = ["builtin-fusion", "builtin-policy", "builtin-univfd", "builtin-pinclip", "builtin-mpft"]
    return Scorer(settings, build_plugin_manager(settings.plugins))


def _inputs(n: int) -> list[DetectorInput]:
    from streamguard.intake import InputContract, prepare

    out = []
    for i in range(n):
        image = decode_image(_jpeg(i, (200 + 10 * i, 160)), IntakeSettings())
        out.append(DetectorInput(pixels=prepare(image, InputContract(224)), image=image))
    return out


def test_probabilities_through_triton_equal_in_process(triton: TritonService, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [ImageJob(key=f"img{i}", data=_jpeg(i, (240 + 40 * i, 200))) for i in range(5)]
    with _scorer(monkeypatch) as local:
        expected = local.score(jobs)
        assert {r.backend_kind for r in local.runners} == {"inprocess"}
    # Three CLIP models share this machine's two cores with the in-process ones: generous timeouts.
    with _scorer(monkeypatch, STREAMGUARD_DETECTORS__BACKEND="triton", STREAMGUARD_TRITON__URL=triton.grpc_address,
                 STREAMGUARD_TRITON__REQUEST_TIMEOUT_S="120", STREAMGUARD_DETECTORS__TIMEOUT_S="300") as remote:
        assert sorted(r.spec.name for r in remote.runners) == sorted(triton.models)
        assert {r.backend_kind for r in remote.runners} == {"triton"}
        assert all(r.ready for r in remote.runners)
        got = remote.score(jobs)
    for a, b in zip(expected, got, strict=True):
        assert a.verdict is not None and b.verdict is not None
        assert [s.detector for s in b.verdict.scores] == [s.detector for s in a.verdict.scores]
        for sa, sb in zip(a.verdict.scores, b.verdict.scores, strict=True):
            assert sa.error is None and sb.error is None, (sa.error, sb.error)
            assert sb.version == sa.version
            assert sb.probability == pytest.approx(sa.probability, abs=1e-3), sa.detector
        assert b.verdict.probability == pytest.approx(a.verdict.probability, abs=1e-3)
        assert b.verdict.label == a.verdict.label


def test_served_version_is_checked(triton: TritonService) -> None:
    backend = TritonBackend(MODEL, TritonSettings(url=triton.grpc_address), expected_version="univfd-1+other")
    try:
        with pytest.raises(VersionMismatch, match="serves version 'univfd-1\\+"):
            backend.predict(_inputs(1))
        assert backend.ready() is False
    finally:
        backend.close()


def test_unreachable_server_is_an_outage_and_opens_the_breaker() -> None:
    settings = TritonSettings(url=f"127.0.0.1:{free_port()}", retry_budget_s=0.5, breaker_failures=2,
                              breaker_reset_s=60, backoff_initial_s=0.05, backoff_max_s=0.1, ready_cache_s=0)
    backend = TritonBackend(MODEL, settings)
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="unavailable after [0-9]+ attempts"):
                backend.predict(_inputs(1))
            assert time.monotonic() - started < 5
        # Open: answered without asking Triton.
        with pytest.raises(BackendUnavailable, match="circuit open"):
            backend.predict(_inputs(1))
        assert backend.ready() is False
    finally:
        backend.close()


def test_a_bad_request_is_the_detectors_error_not_an_outage(triton: TritonService) -> None:
    from streamguard.intake import InputContract, prepare

    backend = TritonBackend(MODEL, TritonSettings(url=triton.grpc_address))
    try:
        image = decode_image(_jpeg(1, (64, 64)), IntakeSettings())
        wrong = DetectorInput(pixels=prepare(image, InputContract(64)), image=image)  # the model wants 224
        with pytest.raises(Exception) as caught:
            backend.predict([wrong])
        assert not isinstance(caught.value, BackendUnavailable)
        assert "PIXELS" in str(caught.value) or "shape" in str(caught.value)
        assert backend.ready() is True
    finally:
        backend.close()


def _spec(triton_model: str | None) -> DetectorSpec:
    return DetectorSpec(name="probe", version="probe-1", triton_model=triton_model,
                        load=lambda ctx: TorchBackend(torch.nn.Identity()))


def test_backend_is_chosen_by_configuration_alone() -> None:
    unused = TritonSettings(url=f"127.0.0.1:{free_port()}", retry_budget_s=0.2, backoff_initial_s=0.05,
                            backoff_max_s=0.05, ready_cache_s=0)
    cases = [
        (DetectorSettings(), "model", "inprocess"),
        (DetectorSettings(backend="triton"), "model", "triton"),
        (DetectorSettings(backend="triton"), None, "inprocess"),  # no Triton model: stays in-process
        (DetectorSettings(backend="triton", backend_overrides={"probe": "inprocess"}), "model", "inprocess"),
        (DetectorSettings(backend_overrides={"probe": "triton"}), "model", "triton"),
    ]
    for settings, model, kind in cases:
        runner = DetectorRunner(_spec(model), settings, unused)
        runner.start()
        try:
            assert runner.backend_kind == kind
            assert isinstance(runner._backend, TritonBackend if kind == "triton" else TorchBackend)
        finally:
            runner.close()


def test_runner_turns_unavailability_into_a_hold_not_an_error_score() -> None:
    unused = TritonSettings(url=f"127.0.0.1:{free_port()}", retry_budget_s=0.2, backoff_initial_s=0.05,
                            backoff_max_s=0.05, ready_cache_s=0)
    runner = DetectorRunner(_spec("model"), DetectorSettings(backend="triton", breaker_failures=1), unused)
    runner.start()
    try:
        inputs = _inputs(2)
        for _ in range(3):
            started = time.perf_counter()
            with pytest.raises(DetectorUnavailable):
                runner.collect(runner.submit(inputs), len(inputs), started)
        # The runner's own breaker counts detector failures only: it stays closed through an outage.
        assert runner.stats.unavailable == 3 and runner.stats.errors == 0
        assert not runner.available() and not runner.ready
    finally:
        runner.close()
