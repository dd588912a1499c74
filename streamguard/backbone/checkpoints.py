"""Operator-supplied CLIP image towers (``backbone.checkpoint``), read into a transformers config and a
float32 state dict of ``CLIPVisionModelWithProjection``.

Accepted:

- a transformers directory: ``config.json`` of a ``CLIPVisionConfig``, or of a full ``CLIPConfig`` whose
  ``vision_config`` is used (with the top-level ``projection_dim``); weights in ``model.safetensors``,
  ``pytorch_model.bin`` or their sharded ``*.index.json`` form. Keys of a full ``CLIPModel`` are filtered to
  the vision tower and ``visual_projection``.
- a single file (``.safetensors``, or ``.pt``/``.bin``/``.pth`` read with ``torch.load(weights_only=True)``)
  holding an OpenAI CLIP state dict (``visual.conv1.weight``, ``visual.transformer.resblocks.N...``,
  ``visual.proj``), or open_clip's (the same names, possibly under ``state_dict`` and/or with a
  ``module.`` prefix), or transformers-named vision tensors.

A single file carries no config, so the architecture is read off tensor shapes: width from ``conv1``,
patch size from its kernel, image size from the positional embedding length ((size / patch)^2 + 1),
layer count from the block indices, MLP width from ``c_fc``, projection size from ``proj``, and
heads = width // 64, the rule of every OpenAI and open_clip ViT (B/16: 12 heads, L/14: 16). The activation
is not visible in the weights: OpenAI's are quick_gelu, the default here; open_clip models trained with
plain GELU (LAION) should be supplied as a transformers directory whose config says ``"hidden_act": "gelu"``.

OpenAI's own downloads (``ViT-L-14.pt``) are TorchScript archives, which ``weights_only`` loading refuses;
the error says how to turn one into a plain state dict once.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import CLIPVisionConfig

from streamguard.backbone.arch import config_from_dict
from streamguard.backbone.errors import CheckpointError

# Transformers tensor names kept from a full CLIPModel: the vision tower and its projection.
_VISION_PREFIXES = ("vision_model.", "visual_projection.")
_OPENAI_BLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")
_HEAD_WIDTH = 64
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")

# OpenAI name -> transformers name, outside the blocks.
_OPENAI_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# Within block N (the fused attention input projection is split separately).
_OPENAI_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}


@dataclass(frozen=True)
class Checkpoint:
    config: CLIPVisionConfig
    state: dict[str, torch.Tensor]
    kind: str  # "transformers-dir", "openai" or "transformers-file"


def read_checkpoint(path: Path, *, hidden_act: str = "quick_gelu") -> Checkpoint:
    """Read an operator checkpoint; ``hidden_act`` applies to single files, which cannot say it."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_transformers_dir(path)
    if not path.is_file():
        raise CheckpointError(f"backbone.checkpoint {path} does not exist")
    state = _unwrap(_load_tensor_file(path), path)
    if any(name.startswith("visual.") for name in state):
        mapped = openai_to_transformers(state)
        return Checkpoint(infer_config(mapped, hidden_act=hidden_act), _float32(mapped), "openai")
    vision = _vision_only(state)
    if vision:
        return Checkpoint(infer_config(vision, hidden_act=hidden_act), _float32(vision), "transformers-file")
    raise CheckpointError(
        f"{path}: not a CLIP image tower: expected OpenAI/open_clip 'visual.*' or transformers "
        f"'vision_model.*' tensors, found e.g. {sorted(state)[:5]}"
    )


def openai_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI / open_clip ``visual.*`` tensors renamed (and split, transposed) for transformers."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, tensor in state.items():
        if not name.startswith("visual."):
            continue  # the text tower, logit_scale
        if name in _OPENAI_TOP:
            out[_OPENAI_TOP[name]] = tensor
        elif name == "visual.proj":
            # OpenAI multiplies x @ proj ([width, out]); nn.Linear stores [out, in].
            out["visual_projection.weight"] = tensor.t().contiguous()
        elif (match := _OPENAI_BLOCK.fullmatch(name)) is not None:
            prefix = f"vision_model.encoder.layers.{match.group(1)}."
            part = match.group(2)
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = part.rsplit("_", 1)[1]  # "weight" / "bias"
                # nn.MultiheadAttention stacks q, k, v along the output dimension.
                for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = chunk.contiguous()
            elif part in _OPENAI_BLOCK_PARTS:
                out[prefix + _OPENAI_BLOCK_PARTS[part]] = tensor
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"not a plain CLIP ViT image tower; unsupported tensors: {sorted(unknown)[:8]}")
    if "visual_projection.weight" not in out:
        raise CheckpointError("the checkpoint has no visual.proj: the image embedding projection is required")
    return out


def infer_config(state: Mapping[str, torch.Tensor], *, hidden_act: str = "quick_gelu") -> CLIPVisionConfig:
    """The ``CLIPVisionConfig`` implied by the shapes of transformers-named vision tensors."""
    try:
        patch = state["vision_model.embeddings.patch_embedding.weight"]
        positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        projection = state["visual_projection.weight"]
        fc1 = state["vision_model.encoder.layers.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CheckpointError(f"cannot infer the architecture: tensor {exc} is missing") from exc
    width, channels, patch_h, patch_w = patch.shape
    grid = math.isqrt(positions - 1)
    layers = {int(m.group(1)) for name in state if (m := _HF_BLOCK.match(name)) is not None}
    problems = [
        *(["non-square patches"] if patch_h != patch_w else []),
        *([f"{positions} positions is not a square grid plus a class token"] if grid * grid != positions - 1 else []),
        *([f"block indices {sorted(layers)} are not 0..N-1"] if layers != set(range(len(layers))) else []),
        *([f"width {width} is not a multiple of {_HEAD_WIDTH}"] if width % _HEAD_WIDTH else []),
        *([f"projection input {projection.shape[1]} != width {width}"] if projection.shape[1] != width else []),
    ]
    if problems:
        raise CheckpointError(f"cannot infer a CLIP ViT architecture: {'; '.join(problems)}")
    try:
        return config_from_dict({
            "hidden_size": width,
            "intermediate_size": fc1.shape[0],
            "projection_dim": projection.shape[0],
            "num_hidden_layers": len(layers),
            "num_attention_heads": width // _HEAD_WIDTH,
            "num_channels": channels,
            "patch_size": patch_h,
            "image_size": grid * patch_h,
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
        })
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def _read_transformers_dir(path: Path) -> Checkpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: a checkpoint directory needs a transformers config.json")
    try:
        raw = json.loads(config_file.read_text())
        if raw.get("model_type") == "clip" or "vision_config" in raw:
            vision = dict(raw.get("vision_config") or {})
            # In a full CLIPConfig the projection size lives at the top; vision_config may hold a stale default.
            vision["projection_dim"] = raw.get("projection_dim", vision.get("projection_dim", 512))
        else:
            vision = raw
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"model_type {vision.get('model_type')!r} is not a CLIP vision model")
        config = config_from_dict(vision)
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{config_file}: {exc}") from exc
    state = _vision_only(_load_dir_weights(path))
    if "visual_projection.weight" not in state:
        raise CheckpointError(f"{path}: no visual_projection.weight (a CLIPVisionModel without projection?)")
    return Checkpoint(config, _float32(state), "transformers-dir")


def _load_dir_weights(path: Path) -> dict[str, torch.Tensor]:
    loaders: list[tuple[str, Callable[[Path], dict[str, torch.Tensor]]]] = [
        ("model.safetensors", _load_safetensors),
        ("model.safetensors.index.json", _load_sharded),
        ("pytorch_model.bin", _load_torch),
        ("pytorch_model.bin.index.json", _load_sharded),
    ]
    for name, loader in loaders:
        if (path / name).is_file():
            return loader(path / name)
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin (or their .index.json)")


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{index}: not a weights index: {exc}") from exc
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_load_tensor_file(index.parent / shard))
    return state


def _load_tensor_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in _TORCH_SUFFIXES:
        return _load_torch(path)
    raise CheckpointError(f"{path}: unsupported file type (use .safetensors, .pt, .pth or .bin)")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            # Read only what the image tower needs: a full CLIP file also holds the text tower.
            names = [n for n in fh.keys() if _wanted(n)]  # noqa: SIM118 - safe_open is not a Mapping
            return {n: fh.get_tensor(n) for n in names}
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file: {exc}") from exc


def _load_torch(path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns before refusing a TorchScript archive
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as exc:
        if "TorchScript" in str(exc):
            raise CheckpointError(
                f"{path} is a TorchScript archive (OpenAI's own download format), which is not loaded "
                "without trusting it. Convert it once: python -c \"import torch; torch.save(torch.jit.load("
                f"'{path}', map_location='cpu').state_dict(), '{path.with_suffix('.state_dict.pt')}')\""
            ) from exc
        raise CheckpointError(f"{path}: unreadable torch file: {exc}") from exc
    except Exception as exc:  # pickle errors of every kind, refused globals under weights_only
        raise CheckpointError(f"{path}: unreadable torch file: {exc.__class__.__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _unwrap(obj: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, from under ``state_dict`` and without a DataParallel ``module.`` prefix."""
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    state = {name.removeprefix("module."): t for name, t in obj.items() if isinstance(t, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: no tensors found")
    return state


def _wanted(name: str) -> bool:
    bare = name.removeprefix("module.")
    return bare.startswith(_VISION_PREFIXES) or bare.startswith("visual.")


def _vision_only(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # position_ids was a persistent buffer in older transformers releases; it is computed, not learned.
    return {n: t for n, t in state.items() if n.startswith(_VISION_PREFIXES) and not n.endswith("position_ids")}


def _float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.to(torch.float32) for name, tensor in state.items()}
