"""The shared trunk on a real tritonserver: `streamguard triton build --shared-trunk` writes the CLIP trunk,
a head per detector and the ensemble wiring them; with ``triton.trunk_model`` the worker's `Scorer` sends each
batch once to the ensemble, and every default CLIP detector scores what it scores in-process (within 1e-3).
The shipped weights on the real backbone, as tests/test_triton_backend.py serves them."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import InferenceServerClient
from tritonclient.grpc import model_config_pb2

from streamguard.backends.triton_grpc import VersionMismatch
from streamguard.backends.triton_trunk import TritonTrunk
from streamguard.config import TritonSettings, load_settings
from streamguard.devstack import TritonService, start_triton
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer
from streamguard.triton.build import build_repository
from streamguard.triton.shared_trunk import ENSEMBLE_MODEL, TRUNK_MODEL, ensemble_output, head_model, version_parameter

DETECTORS = ("univfd", "pin-clip", "mpft")
PLUGINS = ["builtin-fusion", "builtin-policy", "builtin-univfd", "builtin-pinclip", "builtin-mpft"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton-trunk") / "models"
    result = build_repository(root, device="cpu", shared_trunk=True)
    assert set(result.shared_trunk) == set(DETECTORS) and result.shared_trunk == result.models
    return root


@pytest.fixture(scope="module")
def triton(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonService]:
    # Loading the ensemble loads the trunk and the heads it names; the whole-detector models stay unloaded.
    service = start_triton(tmp_path_factory.mktemp("triton-trunk-work"), built, [ENSEMBLE_MODEL], timeout_s=300)
    try:
        yield service
    finally:
        service.stop()


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_the_build_wires_trunk_heads_and_ensemble(built: Path) -> None:
    ensemble = _config(built / ENSEMBLE_MODEL / "config.pbtxt")
    assert ensemble.platform == "ensemble" and [i.name for i in ensemble.input] == ["PIXELS"]
    assert sorted(o.name for o in ensemble.output) == sorted(ensemble_output(d) for d in DETECTORS)
    steps = {s.model_name: s for s in ensemble.ensemble_scheduling.step}
    assert set(steps) == {TRUNK_MODEL, *(head_model(d) for d in DETECTORS)}
    trunk = _config(built / TRUNK_MODEL / "config.pbtxt")
    assert trunk.parameters["role"].string_value == "trunk"
    assert trunk.parameters["blocks"].string_value == '[10, "class-tokens"]'
    assert [(o.name, tuple(o.dims)) for o in trunk.output] == [("HIDDEN_10", (197, 768)), ("CLASS_TOKENS", (12, 768))]
    # Each head reads the trunk's output at its own branch point: univfd every block's class token, the others
    # the hidden states entering block 10.
    for detector, block, tensor in (("univfd", "class-tokens", "class_tokens"), ("pin-clip", "10", "hidden_10"),
                                    ("mpft", "10", "hidden_10")):
        head = _config(built / head_model(detector) / "config.pbtxt")
        assert head.parameters["branch_block"].string_value == block
        assert head.parameters["detector"].string_value == detector
        assert dict(steps[head_model(detector)].input_map) == {"HIDDEN": tensor}
        assert [tuple(i.dims) for i in head.input] == [(12, 768) if detector == "univfd" else (197, 768)]
        assert ensemble.parameters[version_parameter(detector)].string_value == \
            head.parameters["streamguard_version"].string_value
        assert (built / head_model(detector) / "1" / "model.py").is_file()


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + seed)], axis=-1) * 255
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _scorer(**detectors: object) -> Scorer:
    triton = detectors.pop("triton", {})
    settings = load_settings(plugins={"allow": PLUGINS, "deny": []}, detectors={"timeout_s": 300, **detectors},
                             triton=triton)
    return Scorer(settings, build_plugin_manager(settings.plugins))


def test_the_ensemble_scores_as_in_process_with_one_trunk_pass_per_image(triton: TritonService) -> None:
    jobs = [ImageJob(f"img{i}", _jpeg(i, (240 + 40 * i, 200))) for i in range(5)]
    with _scorer() as local:
        expected = local.score(jobs)
    client = InferenceServerClient(triton.grpc_address)
    before = _trunk_inferences(client)
    remote_settings = {"url": triton.grpc_address, "trunk_model": ENSEMBLE_MODEL, "request_timeout_s": 120}
    with _scorer(backend="triton", triton=remote_settings) as remote:
        assert {r.spec.name: r.backend_kind for r in remote.runners} == {d: "triton" for d in DETECTORS}
        assert all(r.load_error is None for r in remote.runners) and remote.available()
        got = remote.score(jobs)
    for want, have in zip(expected, got, strict=True):
        assert want.verdict is not None and have.verdict is not None
        local_scores = {s.detector: s for s in want.verdict.scores}
        for score in have.verdict.scores:
            assert score.error is None, score
            assert score.raw_logit == pytest.approx(local_scores[score.detector].raw_logit, abs=1e-3)
            assert score.probability == pytest.approx(local_scores[score.detector].probability, abs=1e-3)
        assert have.verdict.probability == pytest.approx(want.verdict.probability, abs=1e-3)
    # Three detectors judged five images: the trunk ran once per image, not three times.
    assert _trunk_inferences(client) - before == len(jobs)
    assert client.is_model_ready(head_model("mpft")) and not client.is_model_ready("mpft")


def test_a_view_is_chosen_by_the_client_and_scored_on_the_same_ensemble(triton: TritonService) -> None:
    """``detectors.options.<name>.views``: the crops are cut in the worker and go to the ensemble as images of their
    own; the ensemble serves the version before the ``@`` whatever the views."""
    jobs = [ImageJob(f"wide{i}", _jpeg(i, (420, 260))) for i in range(2)]
    options = {"univfd": {"views": "crops2+whole"}, "pin-clip": {"views": "crops2"}, "mpft": {"views": "resize"}}
    with _scorer(options=options) as local:
        expected = local.score(jobs)
    remote_settings = {"url": triton.grpc_address, "trunk_model": ENSEMBLE_MODEL, "request_timeout_s": 120}
    with _scorer(backend="triton", triton=remote_settings, options=options) as remote:
        assert all(r.load_error is None for r in remote.runners)
        versions = remote.model_versions
        assert versions["univfd"].endswith("@crops2+whole") and versions["pin-clip"].endswith("@crops2")
        assert "@" not in versions["mpft"]
        got = remote.score(jobs)
    for want, have in zip(expected, got, strict=True):
        assert want.verdict is not None and have.verdict is not None
        local_scores = {s.detector: s.raw_logit for s in want.verdict.scores}
        assert {s.detector: s.error for s in have.verdict.scores} == {d: None for d in DETECTORS}
        for score in have.verdict.scores:
            assert score.raw_logit == pytest.approx(local_scores[score.detector], abs=1e-3)


def _trunk_inferences(client: InferenceServerClient) -> int:
    return int(client.get_inference_statistics(TRUNK_MODEL, as_json=True)["model_stats"][0].get("inference_count", 0))


def test_a_detector_version_the_ensemble_does_not_serve_is_refused(triton: TritonService) -> None:
    trunk = TritonTrunk(ENSEMBLE_MODEL, TritonSettings(url=triton.grpc_address, request_timeout_s=120))
    try:
        output = trunk.branch("mpft", "mpft-1+other")
        pixels = [np.zeros((3, 224, 224), np.float32)]
        with pytest.raises(VersionMismatch, match="serves version 'mpft-1\\+.*streamguard_version_mpft"):
            trunk.run(pixels, [output])
        assert trunk.ready() is False  # a mismatch is an outage: nothing is judged by the wrong weights
    finally:
        trunk.close()


