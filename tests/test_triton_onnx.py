"""`streamguard triton build --format onnx`: the exported graph computes what the torch model computes (ONNX
Runtime, dynamic batch), and the config Triton would read parses as a ModelConfig with the ONNX Runtime
platform, the TensorRT fp16 accelerator on GPU and none on CPU, and the detector's version.

Serving it needs Triton's ONNX Runtime backend, which the CPU wheel used here does not carry; the GPU check
runs on a lent GPU machine (see triton_repo/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from google.protobuf import text_format
from test_backbone import tiny_model
from tritonclient.grpc import model_config_pb2

from streamguard.backbone import load_backbone
from streamguard.builtin.cliphead.model import LinearProbe, build_served
from streamguard.builtin.univfd.plugin import DETECTOR as UNIVFD
from streamguard.training.artifacts import save_probe
from streamguard.cli import cli
from streamguard.detectors.spec import CLASS_TOKENS
from streamguard.config import BackboneSettings
from streamguard.triton.shared_trunk import ENSEMBLE_MODEL, HEAD_INPUT, TRUNK_MODEL, head_model, hidden_tensor


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> tuple[BackboneSettings, dict[str, Path]]:
    """The tiny backbone, and a univfd head on its output embedding and one on every block's class token."""
    root = tmp_path_factory.mktemp("onnx")
    model = tiny_model(seed=3)
    model.save_pretrained(root / "clip")
    backbone = BackboneSettings(cache_dir=root / "cache", checkpoint=root / "clip")
    torch.manual_seed(0)
    save_probe(LinearProbe(16), root / "embedding", {"test": True})
    classes = LinearProbe(model.config.num_hidden_layers * model.config.hidden_size)
    save_probe(classes, root / CLASS_TOKENS, {"test": True}, reads=CLASS_TOKENS)
    return backbone, {"embedding": root / "embedding", CLASS_TOKENS: root / CLASS_TOKENS}


@pytest.fixture(params=["embedding", CLASS_TOKENS])
def tiny(request: pytest.FixtureRequest,
         heads: tuple[BackboneSettings, dict[str, Path]]) -> tuple[BackboneSettings, Path]:
    backbone, paths = heads
    return backbone, paths[request.param]


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_onnx_build(tiny: tuple[BackboneSettings, Path], tmp_path: Path, device: str,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    backbone, head = tiny
    monkeypatch.setenv("STREAMGUARD_BACKBONE__CHECKPOINT", str(backbone.checkpoint))
    result = CliRunner().invoke(cli, ["triton", "build", "--format", "onnx", "--device", device, "--model", "univfd",
                                       "--weights", f"univfd={head}", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["format"] == "onnx" and summary["models"] == {"univfd": UNIVFD.version(head)}
    model_dir = tmp_path / "univfd"
    assert sorted(p.name for p in model_dir.rglob("*") if p.is_file()) == ["config.pbtxt", "model.onnx"]

    config = _config(model_dir / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert config.name == "univfd"
    assert config.parameters["streamguard_version"].string_value == summary["models"]["univfd"]
    assert [tuple(i.dims) for i in config.input] == [(3, 224, 224)] and config.input[0].name == "PIXELS"
    kind = model_config_pb2.ModelInstanceGroup.KIND_GPU if device == "gpu" else model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert [g.kind for g in config.instance_group] == [kind]
    accelerators = list(config.optimization.execution_accelerators.gpu_execution_accelerator)
    if device == "gpu":
        assert [a.name for a in accelerators] == ["tensorrt"]
        assert accelerators[0].parameters["precision_mode"] == "FP16"
    else:
        assert accelerators == []

    model = build_served(UNIVFD, load_backbone(backbone), head).eval()
    pixels = np.random.default_rng(1).normal(size=(5, 3, 224, 224)).astype(np.float32)
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["LOGITS"], {"PIXELS": pixels})[0]
    with torch.inference_mode():
        expected = model(torch.from_numpy(pixels)).numpy()
    assert got.shape == (5, 1)
    np.testing.assert_allclose(got[:, 0], expected, atol=1e-4, rtol=0)


def test_onnx_shared_trunk_build(tiny: tuple[BackboneSettings, Path], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared trunk as ONNX graphs for the GPU path: trunk and head in ONNX Runtime, wired as the
    ensemble wires them, give the whole model's logits; the configs carry TensorRT fp16 and the tensors."""
    backbone, head = tiny
    monkeypatch.setenv("STREAMGUARD_BACKBONE__CHECKPOINT", str(backbone.checkpoint))
    result = CliRunner().invoke(cli, ["triton", "build", "--format", "onnx", "--device", "gpu", "--shared-trunk",
                                       "--model", "univfd", "--weights", f"univfd={head}", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["shared_trunk"] == {"model": ENSEMBLE_MODEL, "detectors": {"univfd": UNIVFD.version(head)}}
    for model in (TRUNK_MODEL, head_model("univfd")):
        assert sorted(p.name for p in (tmp_path / model).rglob("*") if p.is_file()) == ["config.pbtxt", "model.onnx"]
        config = _config(tmp_path / model / "config.pbtxt")
        assert config.platform == "onnxruntime_onnx" and config.name == model and "role" not in config.parameters
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    trunk_config = _config(tmp_path / TRUNK_MODEL / "config.pbtxt")
    head_config = _config(tmp_path / head_model("univfd") / "config.pbtxt")
    point = UNIVFD.branch_block(head) or 2  # the tiny backbone has 2 blocks
    assert [o.name for o in trunk_config.output] == [hidden_tensor(point)]
    assert [(i.name, tuple(i.dims)) for i in head_config.input] == [
        (HEAD_INPUT, tuple(trunk_config.output[0].dims))]
    assert head_config.parameters["streamguard_version"].string_value == UNIVFD.version(head)
    ensemble = _config(tmp_path / ENSEMBLE_MODEL / "config.pbtxt")
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == [TRUNK_MODEL, head_model("univfd")]

    pixels = np.random.default_rng(2).normal(size=(4, 3, 224, 224)).astype(np.float32)
    trunk = ort.InferenceSession(str(tmp_path / TRUNK_MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (hidden,) = trunk.run([hidden_tensor(point)], {"PIXELS": pixels})
    branch = ort.InferenceSession(str(tmp_path / head_model("univfd") / "1" / "model.onnx"),
                                  providers=["CPUExecutionProvider"])
    (got,) = branch.run(["LOGITS"], {HEAD_INPUT: hidden})
    with torch.inference_mode():
        expected = build_served(UNIVFD, load_backbone(backbone), head).eval()(torch.from_numpy(pixels)).numpy()
    assert got.shape == (4, 1)
    np.testing.assert_allclose(got[:, 0], expected, atol=1e-4, rtol=0)


def test_python_build_has_one_model_per_detector_with_weights(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["triton", "build", str(tmp_path)])
    assert result.exit_code == 0, result.output
    models = json.loads(result.output.strip().splitlines()[-1])["models"]
    assert "univfd" in models and set(models) <= {"univfd", "pin-clip", "mpft"}
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(f"{name}/{leaf}" for name in models for leaf in ("1/model.py", "config.pbtxt"))
    for name, version in models.items():
        config = _config(tmp_path / name / "config.pbtxt")
        assert config.name == name and config.backend == "python"
        assert config.parameters["detector"].string_value == name
        assert config.parameters["streamguard_version"].string_value == version


def test_unknown_or_untrained_models_are_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["triton", "build", "--model", "nope", str(tmp_path)])
    assert result.exit_code != 0 and "no served detector 'nope'" in result.output
    result = CliRunner().invoke(cli, ["triton", "build", "--model", "mpft", "--weights", f"mpft={tmp_path}",
                                      str(tmp_path / "out")])
    assert result.exit_code != 0 and "no mpft weights" in result.output
