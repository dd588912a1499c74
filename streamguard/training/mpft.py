"""MPFT (arXiv 2601.03586): fine-tuning while masking the most textured patches (Texture-Aware Masking).

Texture of a ViT patch: the sum of absolute differences between neighbouring pixels in four directions
(horizontal, vertical and both diagonals), pairs inside the patch only, over the three channels of the
de-normalised pixels (the rich/poor texture measure of PatchCraft-style detectors). In training the top
``rho`` of patch tokens by texture are dropped, ``rho ~ U(rho_min, rho_max)`` once per batch from the
run's seeded generator; the class token stays and the kept tokens carry their position embeddings, so
nothing else changes. Dropping also cuts the tuned blocks' compute roughly by ``1 - rho``. Nothing is
masked at validation or inference.

Where tokens are dropped: at the entry of the tuned blocks. With ``--tune-blocks all`` that is the input,
as in the paper. With the CPU recipe (last N blocks tuned on cached prefix outputs) it is after the frozen
blocks, which have already mixed some of the textured patches' information into every token: an
approximation that keeps the method's pressure (the tuned blocks never see the textured tokens) at a
fraction of the cost. Ablations: ``random`` drops the same number of tokens chosen at random, ``none``
drops nothing (plain LoRA fine-tuning).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from streamguard.training.objective import bce

MpftMode = Literal["texture", "random", "none"]
MPFT_MODES: tuple[MpftMode, ...] = ("texture", "random", "none")


@dataclass(frozen=True)
class MpftConfig:
    mode: MpftMode = "texture"
    rho_min: float = 0.3
    rho_max: float = 0.7

    def __post_init__(self) -> None:
        if self.mode not in MPFT_MODES:
            raise ValueError(f"mpft mode must be one of {MPFT_MODES}, not {self.mode!r}")
        if not 0.0 <= self.rho_min <= self.rho_max < 1.0:
            raise ValueError(f"need 0 <= rho_min <= rho_max < 1, got {self.rho_min}, {self.rho_max}")


def texture_scores(pixels: torch.Tensor, patch: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, patches) texture of each ViT patch of normalised ``pixels`` (N, 3, H, W), patches in token order."""
    n, channels, height, width = pixels.shape
    rows, cols = height // patch, width // patch
    scale = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    shift = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    x = (pixels * scale + shift)[:, :, : rows * patch, : cols * patch]
    # (N, C, rows, patch, cols, patch) -> (N, rows, cols, C, patch, patch): one patch per (row, col).
    x = x.reshape(n, channels, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    horizontal = (x[..., :, 1:] - x[..., :, :-1]).abs().sum(dim=(-3, -2, -1))
    vertical = (x[..., 1:, :] - x[..., :-1, :]).abs().sum(dim=(-3, -2, -1))
    diagonal = (x[..., 1:, 1:] - x[..., :-1, :-1]).abs().sum(dim=(-3, -2, -1))
    anti_diagonal = (x[..., 1:, :-1] - x[..., :-1, 1:]).abs().sum(dim=(-3, -2, -1))
    return (horizontal + vertical + diagonal + anti_diagonal).reshape(n, rows * cols)


def tokens_to_keep(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Indices (N, K) of the patches left after dropping the ``round(rho * P)`` highest-scoring ones.

    At least one patch is kept; ties keep the earlier patch (stable sort); indices come back ascending.
    """
    patches = scores.shape[1]
    drop = min(round(rho * patches), patches - 1)
    order = torch.argsort(scores, dim=1, stable=True)
    return torch.sort(order[:, : patches - drop], dim=1).values


class MpftObjective:
    name = "mpft"

    def __init__(self, cfg: MpftConfig) -> None:
        self.cfg = cfg
        self.module = torch.nn.Module()  # MPFT trains nothing of its own

    def rho(self, generator: torch.Generator) -> float:
        u = float(torch.rand((), generator=generator))
        return self.cfg.rho_min + (self.cfg.rho_max - self.cfg.rho_min) * u

    def keep_tokens(self, texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        if self.cfg.mode == "none":
            return None
        rho = self.rho(generator)
        # Random scores from the same generator: "random" drops as many tokens, blind to texture.
        scores = texture if self.cfg.mode == "texture" else torch.rand(texture.shape, generator=generator)
        return tokens_to_keep(scores.cpu(), rho).to(texture.device)

    def loss(self, features: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        loss = bce(head(features).squeeze(-1), labels)
        return loss, {"bce": float(loss.detach())}
