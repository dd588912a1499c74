"""Trainable LoRA adapters on a CLIP ViT's attention projections: added, saved, loaded, merged.

B starts at zero, so an untrained adapter is exactly the base model. The file format, the layout check
and merging saved adapters for serving live beside the backbone (`streamguard.backbone.lora`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from transformers import CLIPVisionModelWithProjection

from streamguard.backbone.lora import LoraConfig, LoraMismatch, projection_path


class LoraLinear(torch.nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = alpha / rank
        weight = base.weight
        # PEFT's initialisation (Kaiming-uniform A, zero B), drawn from a seeded generator on the CPU so a
        # seeded run gives the same adapters on any device.
        a = torch.empty(rank, base.in_features, dtype=weight.dtype)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = torch.nn.Parameter(a.to(weight.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self) -> torch.nn.Linear:
        out = torch.nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                              device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scaling * (self.lora_B @ self.lora_A))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.requires_grad_(False)


def add_lora(model: CLIPVisionModelWithProjection, layers: Iterable[int], cfg: LoraConfig, seed: int) -> None:
    """Wrap ``cfg.targets`` of each of ``layers`` in a `LoraLinear`, in place; A drawn in a fixed order."""
    generator = torch.Generator().manual_seed(seed)
    encoder_layers = model.vision_model.encoder.layers
    for layer in sorted(layers):
        attention = encoder_layers[layer].self_attn
        for target in cfg.targets:
            base = getattr(attention, target)
            if isinstance(base, LoraLinear):
                raise ValueError(f"{projection_path(layer, target)} already has an adapter")
            setattr(attention, target, LoraLinear(base, cfg.rank, cfg.alpha, generator))


def lora_modules(model: CLIPVisionModelWithProjection) -> dict[str, LoraLinear]:
    """Adapted projections by transformers name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def lora_state(model: CLIPVisionModelWithProjection) -> dict[str, torch.Tensor]:
    """``<projection>.lora_A`` / ``.lora_B`` of every adapter, detached on the CPU."""
    state = {}
    for path, module in lora_modules(model).items():
        state[f"{path}.lora_A"] = module.lora_A.detach().cpu().contiguous()
        state[f"{path}.lora_B"] = module.lora_B.detach().cpu().contiguous()
    return state


def load_lora_state(model: CLIPVisionModelWithProjection, state: Mapping[str, torch.Tensor]) -> None:
    """Copy adapters in; every adapter of ``model`` must be in ``state`` with its shape, and nothing else."""
    modules = lora_modules(model)
    expected = {f"{path}.lora_{part}" for path in modules for part in "AB"}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise LoraMismatch(f"LoRA tensors do not match the adapted layers: missing {missing[:4]}, extra {extra[:4]}")
    with torch.no_grad():
        for path, module in modules.items():
            for part in ("A", "B"):
                target: torch.nn.Parameter = getattr(module, f"lora_{part}")
                value = state[f"{path}.lora_{part}"]
                if tuple(value.shape) != tuple(target.shape):
                    raise LoraMismatch(f"{path}.lora_{part} has shape {tuple(value.shape)}, the layer needs "
                                       f"{tuple(target.shape)}")
                target.copy_(value)


def merge_lora(model: CLIPVisionModelWithProjection) -> int:
    """Replace every `LoraLinear` by a plain Linear holding the merged weight; returns how many."""
    modules = lora_modules(model)
    for path, module in modules.items():
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, module.merged())
    return len(modules)
