"""LoRA adapters (Hu et al., 2021) on a CLIP ViT's attention projections: their file format, and merging
saved adapters into encoder blocks, which is all serving does with them.

An adapted projection computes ``W x + b + (alpha / rank) * B A x`` with A (rank x in) and B (out x rank);
merged, ``W + (alpha / rank) B A`` replaces W and the served encoder costs what the base costs. Only A and
B are ever saved: a few hundred KB for ViT-B/16, against 340 MB for the encoder they adapt. Trainable
adapters live in `streamguard.training.lora`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
FORMAT = "streamguard-lora-1"
# The safetensors metadata entry that holds the adapters' layout (and the backbone they were made for).
LAYOUT_KEY = "streamguard_lora"


class LoraMismatch(ValueError):
    """Adapters that do not fit the encoder they are applied to (another architecture or backbone)."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, not {self.rank}")
        unknown = sorted(set(self.targets) - set(ATTENTION_PROJECTIONS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be among {ATTENTION_PROJECTIONS}, not {self.targets}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def projection_path(layer: int, target: str) -> str:
    """The transformers name of one attention projection (also the prefix of its adapter's tensors)."""
    return f"vision_model.encoder.layers.{layer}.self_attn.{target}"


def adapter_layout(state: Mapping[str, torch.Tensor]) -> tuple[list[int], list[str], int, int]:
    """(layers, targets, rank, in_features) read off saved adapter tensors."""
    layers: set[int] = set()
    targets: set[str] = set()
    ranks: set[int] = set()
    widths: set[int] = set()
    for name, tensor in state.items():
        parts = name.split(".")
        # vision_model.encoder.layers.<i>.self_attn.<target>.lora_<A|B>
        if (len(parts) != 7 or parts[:3] != ["vision_model", "encoder", "layers"] or not parts[3].isdigit()
                or parts[5] not in ATTENTION_PROJECTIONS or parts[6] not in ("lora_A", "lora_B")):
            raise LoraMismatch(f"not a LoRA tensor of a CLIP vision layer: {name}")
        layers.add(int(parts[3]))
        targets.add(parts[5])
        if parts[6] == "lora_A":
            ranks.add(int(tensor.shape[0]))
            widths.add(int(tensor.shape[1]))
    if len(ranks) != 1 or len(widths) != 1:
        raise LoraMismatch(f"inconsistent adapters: ranks {sorted(ranks)}, input widths {sorted(widths)}")
    return sorted(layers), sorted(targets, key=ATTENTION_PROJECTIONS.index), ranks.pop(), widths.pop()


@dataclass(frozen=True)
class Adapters:
    """Saved adapters: their tensors, the blocks and projections they adapt, and how they were made."""

    state: dict[str, torch.Tensor]
    layers: list[int]
    config: LoraConfig
    width: int
    layout: dict[str, Any]  # as written beside them: backbone, hidden_size, num_hidden_layers, rank, alpha, ...


def read_adapters(path: Path) -> Adapters:
    with safe_open(str(path), framework="pt") as handle:
        layout: dict[str, Any] = json.loads((handle.metadata() or {}).get(LAYOUT_KEY, "{}"))
    state = load_file(str(path))
    layers, targets, rank, width = adapter_layout(state)
    config = LoraConfig(rank=rank, alpha=float(layout.get("alpha", 2 * rank)), targets=tuple(targets))
    return Adapters(state, layers, config, width, layout)


def merge_adapters(blocks: Mapping[int, torch.nn.Module], adapters: Adapters) -> int:
    """Add each adapter's ``(alpha / rank) B A`` to its projection's weight, in place; returns how many.

    ``blocks`` maps encoder block indices to the blocks to change: a whole encoder's, or a detector's own
    copies of the blocks it tunes (the shared trunk's must stay frozen). Every block the adapters name must
    be there, and every tensor must fit its projection.
    """
    missing = sorted(set(adapters.layers) - set(blocks))
    if missing:
        raise LoraMismatch(f"adapters for blocks {missing} but no such blocks to merge them into")
    scaling = adapters.config.scaling
    merged = 0
    with torch.no_grad():
        for layer in adapters.layers:
            attention = blocks[layer].self_attn  # type: ignore[union-attr]
            for target in adapters.config.targets:
                path = projection_path(layer, target)
                a, b = adapters.state.get(f"{path}.lora_A"), adapters.state.get(f"{path}.lora_B")
                if a is None or b is None:
                    raise LoraMismatch(f"{path}: adapter tensors missing (every adapted block needs "
                                       f"{', '.join(adapters.config.targets)})")
                base: torch.nn.Linear = getattr(attention, target)
                weight = base.weight
                if tuple(a.shape) != (adapters.config.rank, base.in_features) or \
                        tuple(b.shape) != (base.out_features, adapters.config.rank):
                    raise LoraMismatch(f"{path}: adapters of shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit a "
                                       f"{base.out_features}x{base.in_features} projection")
                a, b = a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype)
                # The same arithmetic as a trained `LoraLinear.merged()`: W + scaling * (B @ A).
                weight.copy_(weight + scaling * (b @ a))
                merged += 1
    return merged
