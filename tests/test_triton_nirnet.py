"""NIRNet on a real tritonserver: `streamguard triton build --weights nirnet=DIR` writes its parts (extractor,
noise and frequency branches, CLIP and the semantic MLP, fusion head), each its own Python-backend model with
dynamic batching, and the ensemble wiring them; the server loads them, and the ensemble scores what the
in-process detector scores (within 1e-3) on multi-crop images of several sizes.

Two tiny random (seeded) NIRNets, saved with `save_model`, on the tiny CLIP the NIRNet tests make:
- without the semantic branch, the worker selects the ensemble by configuration (``detectors.backend``) and
  calls it through its generic Triton backend, through the Scorer;
- with it, the ensemble also takes each crop's whole image and runs CLIP itself, called through
  `NirnetTritonBackend` as the runner would (each crop an input, logits aggregated per image)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from google.protobuf import text_format
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
from tritonclient.grpc import InferenceServerClient, model_config_pb2

from images import encode
from streamguard.backbone import load_backbone
from streamguard.backends.triton_grpc import TritonBackend, VersionMismatch
from streamguard.backends.triton_nirnet import NirnetTritonBackend
from streamguard.builtin.nirnet.files import NirnetConfig, version
from streamguard.builtin.nirnet.model import NIRNet, save_model
from streamguard.builtin.nirnet.plugin import DETECTOR
from streamguard.cli import cli
from streamguard.config import BackboneSettings, IntakeSettings, Settings, TritonSettings, load_settings
from streamguard.detectors.spec import Calibration, DetectorInput
from streamguard.devstack import TritonService, start_triton
from streamguard.intake import decode_image
from streamguard.intake.contract import InputContract, aggregate_logits, prepare_views
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer
from streamguard.triton.nirnet_parts import (
    CLIP_MODEL,
    ENSEMBLE_MODEL,
    EXTRACTOR_MODEL,
    FREQUENCY_MODEL,
    HEAD_MODEL,
    NOISE_MODEL,
    SEMANTIC_MODEL,
)

EMBED = 16
TINY = NirnetConfig(crop_size=32, crops=4, extractor_depth=2, extractor_width=8, branch_width=8, feature_dim=8,
                    spectrum_grid=4, semantic_dim=EMBED, hidden_dim=8)
PLAIN = replace(TINY, branches=("noise", "frequency"))
ALL_PARTS = (EXTRACTOR_MODEL, NOISE_MODEL, FREQUENCY_MODEL, CLIP_MODEL, SEMANTIC_MODEL, HEAD_MODEL)
PLAIN_PARTS = (EXTRACTOR_MODEL, NOISE_MODEL, FREQUENCY_MODEL, HEAD_MODEL)
OTHERS = ["brightness", "provenance", "builtin-univfd", "builtin-pinclip", "builtin-mpft", "builtin-credentials"]
SIZES = [(150, 100), (64, 48), (20, 24), (301, 90), (33, 200)]  # multi-crop, one smaller than a crop


def _model(config: NirnetConfig, seed: int) -> NIRNet:
    torch.manual_seed(seed)
    model = NIRNet(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.25)
    return model


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(9 * x + seed)], axis=-1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def _images() -> list[bytes]:
    return [encode(_photo(w, h, seed=i), "PNG") for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=EMBED, num_hidden_layers=2,
                              num_attention_heads=2, patch_size=8, image_size=32, hidden_act="quick_gelu")
    path = tmp_path_factory.mktemp("nirnet-triton-clip") / "clip"
    CLIPVisionModelWithProjection(config).eval().save_pretrained(path)
    return path


def _save(model: NIRNet, out: Path) -> Path:
    save_model(model, out)
    # The random models' logits are large: a calibration brings the probabilities off 0 and 1, so that they
    # differ between images and a 1e-3 tolerance on them means something.
    Calibration(scale=0.1, bias=1.0, method="platt").save(out)
    return out


def _build(root: Path, weights: Path, clip: Path) -> Path:
    """`streamguard triton build` through the CLI, with the backbone of the environment's settings."""
    result = CliRunner().invoke(cli, ["triton", "build", "--model", "nirnet", "--weights", f"nirnet={weights}",
                                      str(root)], env={"STREAMGUARD_BACKBONE__CHECKPOINT": str(clip)})
    assert result.exit_code == 0, result.output
    assert f'"nirnet": "{version("nirnet", weights)}"' in result.output
    return root


@pytest.fixture(scope="module")
def semantic(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path) -> tuple[Path, Path]:
    """(weights, repository) of a NIRNet with every branch."""
    root = tmp_path_factory.mktemp("nirnet-semantic")
    backbone = load_backbone(BackboneSettings(checkpoint=clip_dir)).version
    weights = _save(_model(replace(TINY, backbone=backbone), seed=3), root / "weights")
    return weights, _build(root / "models", weights, clip_dir)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nirnet-plain")
    weights = _save(_model(PLAIN, seed=4), root / "weights")
    return weights, _build(root / "models", weights, clip_dir)


def _serve(repository: Path, work: Path) -> TritonService:
    started = time.monotonic()
    # Only the ensemble is named: Triton loads the parts it composes, and a part that fails to load fails it.
    service = start_triton(work, repository, [ENSEMBLE_MODEL], timeout_s=300)
    print(f"nirnet ensemble ready in {time.monotonic() - started:.1f}s")
    return service


@pytest.fixture(scope="module")
def semantic_triton(semantic: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonService]:
    service = _serve(semantic[1], tmp_path_factory.mktemp("nirnet-semantic-work"))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def plain_triton(plain: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonService]:
    service = _serve(plain[1], tmp_path_factory.mktemp("nirnet-plain-work"))
    try:
        yield service
    finally:
        service.stop()


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _settings(weights: Path, clip: Path, **detectors: object) -> Settings:
    triton = detectors.pop("triton", {})
    return load_settings(backbone={"checkpoint": str(clip)}, plugins={"deny": OTHERS, "enable": ["builtin-nirnet"]},
                         detectors={"options": {"nirnet": {"weights_dir": str(weights)}}, "timeout_s": None,
                                    **detectors}, triton=triton)


def _scores(settings: Settings, backend: str) -> list[tuple[float, float]]:
    """(raw logit, probability) of each test image, through the Scorer."""
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        (runner,) = scorer.runners
        assert runner.load_error is None, runner.load_error
        assert runner.backend_kind == backend
        outcomes = scorer.score([ImageJob(f"img-{i}", data) for i, data in enumerate(_images())])
    out = []
    for outcome in outcomes:
        assert outcome.verdict is not None, outcome.error
        (score,) = outcome.verdict.scores
        assert score.detector == "nirnet" and score.error is None, score
        out.append((score.raw_logit, score.probability))
    return out


# --- the build ---------------------------------------------------------------------------------------------


def test_the_build_wires_every_part_with_its_own_dynamic_batcher(semantic: tuple[Path, Path]) -> None:
    weights, root = semantic
    served = version("nirnet", weights)
    ensemble = _config(root / ENSEMBLE_MODEL / "config.pbtxt")
    assert ensemble.platform == "ensemble" and ensemble.parameters["streamguard_version"].string_value == served
    assert [(t.name, list(t.dims)) for t in ensemble.input] == [("PIXELS", [3, 32, 32]), ("WHOLE", [3, 32, 32])]
    assert [(t.name, list(t.dims)) for t in ensemble.output] == [("LOGITS", [1])]
    steps = {s.model_name: s for s in ensemble.ensemble_scheduling.step}
    assert set(steps) == set(ALL_PARTS)
    assert dict(steps[EXTRACTOR_MODEL].input_map) == {"CROPS": "PIXELS"}
    assert dict(steps[NOISE_MODEL].input_map) == dict(steps[FREQUENCY_MODEL].input_map) == {"NOISE": "noise"}
    assert dict(steps[CLIP_MODEL].input_map) == {"WHOLE": "WHOLE"}
    assert dict(steps[SEMANTIC_MODEL].input_map) == {"EMBEDDING": "embedding"}
    # The head's inputs in the order NIRNet.features concatenates them.
    head = _config(root / HEAD_MODEL / "config.pbtxt")
    assert [t.name for t in head.input] == ["F_NOISE", "F_FREQ", "F_SEM"]
    assert dict(steps[HEAD_MODEL].input_map) == {"F_NOISE": "f_noise", "F_FREQ": "f_freq", "F_SEM": "f_sem"}
    assert dict(steps[HEAD_MODEL].output_map) == {"LOGITS": "LOGITS"}
    for part in ALL_PARTS:
        config = _config(root / part / "config.pbtxt")
        assert config.backend == "python" and config.max_batch_size >= ensemble.max_batch_size
        assert config.HasField("dynamic_batching"), part
        assert config.parameters["streamguard_version"].string_value == served
        assert config.parameters["weights_dir"].string_value == str(weights.resolve())
        assert (root / part / "1" / "model.py").is_file()
    assert _config(root / CLIP_MODEL / "config.pbtxt").parameters["role"].string_value == "clip"


def test_without_the_semantic_branch_there_is_no_clip_part(plain: tuple[Path, Path]) -> None:
    _, root = plain
    ensemble = _config(root / ENSEMBLE_MODEL / "config.pbtxt")
    assert [t.name for t in ensemble.input] == ["PIXELS"]
    assert {s.model_name for s in ensemble.ensemble_scheduling.step} == set(PLAIN_PARTS)
    assert not (root / CLIP_MODEL).exists()
    assert [t.name for t in _config(root / HEAD_MODEL / "config.pbtxt").input] == ["F_NOISE", "F_FREQ"]


def test_a_semantic_branch_for_another_clip_is_not_built(tmp_path: Path, clip_dir: Path) -> None:
    weights = save_model(_model(replace(TINY, backbone="0123456789ab"), seed=1), tmp_path / "w")
    result = CliRunner().invoke(cli, ["triton", "build", "--weights", f"nirnet={weights}", str(tmp_path / "m")],
                                env={"STREAMGUARD_BACKBONE__CHECKPOINT": str(clip_dir)})
    assert result.exit_code != 0 and "was trained on backbone" in result.output


# --- the server ----------------------------------------------------------------------------------------------


def test_triton_loaded_the_ensemble_and_every_part(semantic_triton: TritonService) -> None:
    client = InferenceServerClient(semantic_triton.grpc_address)
    try:
        for model in (ENSEMBLE_MODEL, *ALL_PARTS):
            assert client.is_model_ready(model), model
        parsed = client.get_model_config(EXTRACTOR_MODEL, as_json=True)["config"]
        assert int(parsed["max_batch_size"]) == 16 and "dynamic_batching" in parsed
    finally:
        client.close()


def test_the_ensemble_without_semantics_is_the_worker_s_triton_model(plain: tuple[Path, Path], clip_dir: Path,
                                                                     plain_triton: TritonService) -> None:
    """Selected by configuration like the CLIP detectors: the generic Triton backend sends the crops as rows."""
    weights, _ = plain
    expected = _scores(_settings(weights, clip_dir), "inprocess")
    triton = {"url": plain_triton.grpc_address, "request_timeout_s": 60}
    client = InferenceServerClient(plain_triton.grpc_address)
    try:
        before = _settled(client, (ENSEMBLE_MODEL,))[ENSEMBLE_MODEL][0]
        got = _scores(_settings(weights, clip_dir, backend="triton", triton=triton), "triton")
        served = _settled(client, (ENSEMBLE_MODEL,))[ENSEMBLE_MODEL][0] - before
    finally:
        client.close()
    assert served == 4 + 4 + 1 + 4 + 4  # every crop of the five images went through the ensemble
    _compare("plain", expected, got)


def _compare(what: str, expected: list[tuple[float, float]], got: list[tuple[float, float]]) -> None:
    logit_error = max(abs(a[0] - b[0]) for a, b in zip(expected, got, strict=True))
    error = max(abs(a[1] - b[1]) for a, b in zip(expected, got, strict=True))
    print(f"{what} ensemble vs in-process over {len(got)} images: max probability error {error:.2e}, "
          f"max raw logit error {logit_error:.2e}; probabilities {[round(p, 4) for _, p in expected]}")
    assert error < 1e-3 and logit_error < 1e-3
    # The images score differently and off the ends: a constant or a saturated answer would not pass.
    logits, probabilities = [v for v, _ in expected], [p for _, p in expected]
    assert len(set(np.round(logits, 2))) == len(expected) and 0.01 < min(probabilities) < max(probabilities) < 0.99


def _flatten(contract: InputContract, images: list[bytes]) -> tuple[list[DetectorInput], list[int]]:
    """Each image's crops as the runner flattens them: one input each, all carrying the image they came from."""
    inputs, counts = [], []
    for data in images:
        image = decode_image(data, IntakeSettings())
        views = prepare_views(image, contract)
        counts.append(len(views))
        inputs.extend(DetectorInput(view, image) for view in views)
    return inputs, counts


def test_the_semantic_ensemble_scores_as_in_process(semantic: tuple[Path, Path], clip_dir: Path,
                                                    semantic_triton: TritonService) -> None:
    weights, _ = semantic
    settings = _settings(weights, clip_dir)
    spec = DETECTOR.spec(settings)
    assert spec is not None and spec.contract is not None
    expected = _scores(settings, "inprocess")
    inputs, counts = _flatten(spec.contract, _images())
    assert max(counts) == 4 and min(counts) == 1 and len(inputs) > 12
    backend = NirnetTritonBackend(TritonSettings(url=semantic_triton.grpc_address, request_timeout_s=60),
                                  expected_version=spec.version)
    try:
        logits = backend.predict(inputs)
        assert backend.served_version == spec.version
    finally:
        backend.close()
    got, at = [], 0
    for n in counts:
        raw = aggregate_logits(logits[at:at + n], spec.contract.aggregate)
        assert raw is not None and math.isfinite(raw)
        got.append((raw, spec.calibration.probability(raw)))
        at += n
    _compare("semantic", expected, got)


def _stats(client: InferenceServerClient, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def _settled(client: InferenceServerClient, models: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Counts once they stop moving: Triton updates them after the responses go out."""
    previous = {m: _stats(client, m) for m in models}
    for _ in range(20):
        time.sleep(0.3)
        current = {m: _stats(client, m) for m in models}
        if current == previous:
            return current
        previous = current
    return previous


def test_concurrent_requests_are_batched_in_every_part(semantic: tuple[Path, Path], clip_dir: Path,
                                                       semantic_triton: TritonService) -> None:
    weights, _ = semantic
    spec = DETECTOR.spec(_settings(weights, clip_dir))
    assert spec is not None and spec.contract is not None
    inputs, _ = _flatten(spec.contract, _images() * 4)
    client = InferenceServerClient(semantic_triton.grpc_address)
    # One crop a request, all in flight at once: only the parts' batchers can put them together.
    backend = NirnetTritonBackend(TritonSettings(url=semantic_triton.grpc_address, request_timeout_s=60,
                                                 request_batch_size=1, max_requests_in_flight=64),
                                  expected_version=spec.version)
    try:
        before = _settled(client, ALL_PARTS)
        logits = backend.predict(inputs)
        after = _settled(client, ALL_PARTS)
    finally:
        backend.close()
        client.close()
    assert len(logits) == len(inputs) and all(math.isfinite(v) for v in logits)  # type: ignore[arg-type]
    for part in ALL_PARTS:
        rows = after[part][0] - before[part][0]
        executions = after[part][1] - before[part][1]
        print(f"{part}: {rows} crops in {executions} executions, mean batch {rows / max(executions, 1):.2f}")
        assert rows == len(inputs), part
        assert rows / executions > 1, part


def test_a_version_the_ensemble_does_not_serve_is_refused(semantic_triton: TritonService,
                                                          plain_triton: TritonService) -> None:
    crops = [DetectorInput(np.zeros((3, 32, 32), np.float32),
                           decode_image(encode(_photo(40, 40, seed=0), "PNG"), IntakeSettings()))]
    for service, backend_type in ((semantic_triton, NirnetTritonBackend), (plain_triton, None)):
        settings = TritonSettings(url=service.grpc_address, request_timeout_s=30)
        backend = (NirnetTritonBackend(settings, expected_version="nirnet-1+other") if backend_type is not None
                   else TritonBackend(ENSEMBLE_MODEL, settings, expected_version="nirnet-1+other", detector="nirnet"))
        try:
            with pytest.raises(VersionMismatch, match="serves version 'nirnet-1\\+"):
                backend.predict(crops)
            assert backend.ready() is False  # an outage: nothing is judged by other weights
        finally:
            backend.close()


def test_the_spec_selects_the_ensemble_and_the_backend_that_feeds_it(plain: tuple[Path, Path],
                                                                      semantic: tuple[Path, Path], clip_dir: Path) -> None:
    plain_spec = DETECTOR.spec(_settings(plain[0], clip_dir))
    semantic_spec = DETECTOR.spec(_settings(semantic[0], clip_dir))
    assert plain_spec is not None and plain_spec.triton_model == ENSEMBLE_MODEL
    assert plain_spec.triton_backend is None  # the crops alone: the generic Triton backend sends them
    # The whole image too: the generic backend would not send it, so the spec names the one that does.
    assert semantic_spec is not None and semantic_spec.triton_model == ENSEMBLE_MODEL
    assert semantic_spec.triton_backend is not None


def test_the_semantic_ensemble_is_the_worker_s_triton_model(semantic: tuple[Path, Path], clip_dir: Path,
                                                            semantic_triton: TritonService) -> None:
    """Through the Scorer with ``detectors.backend = "triton"``, as the worker judges: the runner builds the
    spec's backend, which sends each crop with its whole image."""
    weights, _ = semantic
    expected = _scores(_settings(weights, clip_dir), "inprocess")
    triton = {"url": semantic_triton.grpc_address, "request_timeout_s": 60}
    got = _scores(_settings(weights, clip_dir, backend="triton", triton=triton), "triton")
    _compare("semantic via the runner", expected, got)
