"""PiN-CLIP (arXiv 2511.16136): fine-tuning with positive-incentive noise in feature space.

A noise generator (PiNI's design) attends from the image embedding (query) to two class embeddings,
"real" and "fake" (keys and values); one linear head turns the result into the noise mean, a second one
with softplus into its positive scale. In training the head sees both the clean feature z and the noisy
z' = z + mean + scale * eps, and the loss is

    BCE(head(z')) + BCE(head(z)) + beta * KL(N(mean, scale^2) || N(0, I))

(the KL summed over feature dimensions, averaged over the batch). At validation and inference there is no
noise: the served model is the clean path, encoder + merged LoRA + head, like a linear probe.

Choices where the paper is silent (see docs' design notes):
- z is the L2-normalised image embedding the head reads; z' is not re-normalised, so the noise keeps the
  size the generator gives it and the KL term is what bounds it.
- The attention output is added to the projected query (a transformer's cross-attention residual): with
  only two keys the attention alone carries one number per image (how "fake" it looks), the residual lets
  the noise depend on the image itself.
- No text tower is available offline, so the class embeddings are learnable and initialised from the
  seed; real text embeddings ("A real photo" / "A fake photo", one row each) can be loaded from a file and
  are then kept frozen, as the paper's text encoder is.
- The mean head starts at zero and the scale at ``noise_scale``, the same size as the ``gaussian``
  ablation's noise: the ablation compares learned noise against random noise of the learned one's start.
Ablations: ``gaussian`` (z' = z + noise_scale * eps, no generator, no KL), ``none`` (clean BCE only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from streamguard.training.objective import bce

PinMode = Literal["learned", "gaussian", "none"]
PIN_MODES: tuple[PinMode, ...] = ("learned", "gaussian", "none")
REAL_ROW, FAKE_ROW = 0, 1
# softplus underflows to 0 for pre-activations below about -100, and the KL's log(scale) would be -inf.
_MIN_SCALE = 1e-6


@dataclass(frozen=True)
class PinClipConfig:
    mode: PinMode = "learned"
    beta: float = 1e-3
    noise_scale: float = 0.02
    attn_dim: int = 64
    class_embeddings: Path | None = None

    def __post_init__(self) -> None:
        if self.mode not in PIN_MODES:
            raise ValueError(f"pin-clip mode must be one of {PIN_MODES}, not {self.mode!r}")
        if self.beta < 0 or self.noise_scale <= 0 or self.attn_dim <= 0:
            raise ValueError("beta must be >= 0, noise_scale and attn_dim > 0")


def load_class_embeddings(path: Path, embed_dim: int) -> torch.Tensor:
    """A (2, embed_dim) tensor, row 0 "real", row 1 "fake", from ``.safetensors`` (one tensor) or ``.npy``."""
    if path.suffix == ".npy":
        tensor = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ValueError(f"{path}: expected one tensor of class embeddings, found {sorted(tensors)}")
        (tensor,) = tensors.values()
    if tuple(tensor.shape) != (2, embed_dim):
        raise ValueError(f"{path}: class embeddings must have shape (2, {embed_dim}) (real, fake), "
                         f"not {tuple(tensor.shape)}")
    return tensor.float()


def kl_standard_normal(mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(scale^2)) || N(0, I)), summed over the last dimension, averaged over the rest."""
    per_dim = 0.5 * (scale.pow(2) + mean.pow(2) - 1.0) - torch.log(scale)
    return per_dim.sum(dim=-1).mean()


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


class NoiseGenerator(torch.nn.Module):
    """Cross-attention (query: image embedding; keys/values: the class embeddings) -> (mean, scale)."""

    def __init__(self, embed_dim: int, attn_dim: int, seed: int, noise_scale: float,
                 class_embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        if class_embeddings is None:
            self.classes = torch.nn.Parameter(torch.randn(2, embed_dim, generator=generator))
        else:
            self.register_buffer("classes", class_embeddings.detach().clone())
        self.query = torch.nn.Linear(embed_dim, attn_dim)
        self.key = torch.nn.Linear(embed_dim, attn_dim)
        self.value = torch.nn.Linear(embed_dim, attn_dim)
        self.mean = torch.nn.Linear(attn_dim, embed_dim)
        self.scale = torch.nn.Linear(attn_dim, embed_dim)
        with torch.no_grad():
            for layer in (self.query, self.key, self.value, self.scale):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / math.sqrt(layer.in_features))
                layer.bias.zero_()
            self.mean.weight.zero_()
            self.mean.bias.zero_()
            self.scale.weight.mul_(0.1)
            self.scale.bias.fill_(_inverse_softplus(noise_scale))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Class embeddings are compared by direction, as CLIP compares text and image embeddings.
        classes = torch.nn.functional.normalize(self.classes, dim=-1)
        query = self.query(z)
        keys, values = self.key(classes), self.value(classes)
        weights = torch.softmax(query @ keys.t() / math.sqrt(query.shape[-1]), dim=-1)
        hidden = query + weights @ values
        return self.mean(hidden), torch.nn.functional.softplus(self.scale(hidden)) + _MIN_SCALE


class FeatureNoise(torch.nn.Module):
    """z -> (z', KL): positive-incentive noise in training mode, the identity (and no KL) in eval mode."""

    def __init__(self, cfg: PinClipConfig, embed_dim: int, seed: int) -> None:
        super().__init__()
        self.mode = cfg.mode
        self.noise_scale = cfg.noise_scale
        self.generator: NoiseGenerator | None = None
        if cfg.mode == "learned":
            classes = load_class_embeddings(cfg.class_embeddings, embed_dim) if cfg.class_embeddings else None
            self.generator = NoiseGenerator(embed_dim, cfg.attn_dim, seed, cfg.noise_scale, classes)

    def forward(self, z: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.training or self.mode == "none":
            return z, None
        # Drawn on the CPU from the run's generator: the same noise on any device, and on resume.
        eps = torch.randn(z.shape, generator=rng).to(device=z.device, dtype=z.dtype)
        if self.generator is None:
            return z + self.noise_scale * eps, None
        mean, scale = self.generator(z)
        return z + mean + scale * eps, kl_standard_normal(mean, scale)


class PinClipObjective:
    name = "pin-clip"

    def __init__(self, cfg: PinClipConfig, embed_dim: int, seed: int) -> None:
        self.cfg = cfg
        self.module = FeatureNoise(cfg, embed_dim, seed)

    def keep_tokens(self, texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        return None

    def loss(self, features: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        clean = bce(head(features).squeeze(-1), labels)
        parts = {"bce_clean": float(clean.detach())}
        if self.cfg.mode == "none":
            return clean, parts
        noisy_features, kl = self.module(features, generator)
        noisy = bce(head(noisy_features).squeeze(-1), labels)
        parts["bce_noisy"] = float(noisy.detach())
        total = clean + noisy
        if kl is not None:
            parts["kl"] = float(kl.detach())
            total = total + self.cfg.beta * kl
        return total, parts
