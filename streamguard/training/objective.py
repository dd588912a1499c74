"""What a fine-tuning method adds to the shared training loop (`trainer`).

A method decides which patch tokens the tuned blocks see in a training batch (MPFT's masking) and the loss
on the L2-normalised embeddings (PiN-CLIP's noise and KL term); its training-only parameters (PiN-CLIP's
noise generator) live in ``module``, are checkpointed with the rest and never shipped. Validation and the
served model use neither: all tokens, clean features.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    name: str
    module: torch.nn.Module

    def keep_tokens(self, texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """Indices (N, K) of the patch tokens to keep in this training batch, 0-based; None keeps all."""
        ...

    def loss(self, features: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss on ``features`` (N, embed_dim), and its parts by name for the log."""
        ...


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
