"""A tiny convolutional autoencoder shaped like a latent-diffusion VAE, trained here on images.

Its reconstruction error stands in for a real generator's VAE when no VAE weights are available offline:
the encoder downsamples by ``factor`` (4 or 8, as latent-diffusion VAEs do) into a few latent channels, and
the decoder upsamples with nearest-neighbour + convolution (the upsampling of the SD VAE's decoder), so
x - AE(x) carries the same kind of periodic upsampling texture that generated images carry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# What the autoencoder is trained on wherever it stands in for a VAE (NIRNet's residual source, univfd's
# matched twins): a seeded choice of this many training images, one native crop of this side from each.
TRAINING_IMAGES = 256
TRAINING_CROP = 64


@dataclass(frozen=True)
class AutoencoderConfig:
    factor: int = 4  # spatial downsampling, a power of two
    width: int = 16  # channels of every hidden layer
    latent_channels: int = 4  # as SD's VAE: the bottleneck that makes reconstruction lossy

    def __post_init__(self) -> None:
        if self.factor < 2 or self.factor & (self.factor - 1):
            raise ValueError(f"factor must be a power of two >= 2, got {self.factor}")


class TinyAutoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        w, steps = config.width, int(math.log2(config.factor))
        down: list[nn.Module] = [nn.Conv2d(3, w, 3, padding=1), nn.SiLU()]
        for _ in range(steps):
            down += [nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU()]
        down.append(nn.Conv2d(w, config.latent_channels, 1))
        up: list[nn.Module] = [nn.Conv2d(config.latent_channels, w, 3, padding=1), nn.SiLU()]
        for _ in range(steps):
            up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, w, 3, padding=1), nn.SiLU()]
        up.append(nn.Conv2d(w, 3, 3, padding=1))
        self.encoder = nn.Sequential(*down)
        self.decoder = nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H, W) in [0, 1] of any size: reflect-padded to a multiple of ``factor`` and cropped back,
        so the residual covers every pixel of a native crop."""
        h, w = x.shape[-2:]
        f = self.config.factor
        pad_h, pad_w = -h % f, -w % f
        padded = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x
        return self(padded)[..., :h, :w].clamp(0.0, 1.0)


@dataclass
class TrainedAutoencoder:
    model: TinyAutoencoder
    losses: list[float]  # L1 reconstruction loss per step
    steps: int
    seed: int


def train_autoencoder(
    images: Sequence[torch.Tensor],
    steps: int = 200,
    seed: int = 0,
    *,
    config: AutoencoderConfig | None = None,
    crop: int = 64,
    batch_size: int = 8,
    lr: float = 2e-3,
) -> TrainedAutoencoder:
    """Train on random native crops of ``images`` ((3, H, W) in [0, 1], each at least ``crop`` square).

    Seeded end to end (initialisation, crops, order) without touching the global RNG. L1 like the SD VAE's
    pixel loss; no perceptual or adversarial terms: we want its upsampling texture, not sharpness.
    """
    config = config or AutoencoderConfig()
    if crop % config.factor:
        raise ValueError(f"crop {crop} must be a multiple of the factor {config.factor}")
    small = [tuple(img.shape) for img in images if min(img.shape[-2:]) < crop]
    if not images or small:
        raise ValueError(f"need images of at least {crop}x{crop}; got {len(images)} images, too small: {small[:3]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyAutoencoder(config)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        batch = torch.stack([_random_crop(images, crop, generator) for _ in range(batch_size)])
        loss = F.l1_loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return TrainedAutoencoder(model, losses, steps, seed)


def _random_crop(images: Sequence[torch.Tensor], crop: int, generator: torch.Generator) -> torch.Tensor:
    img = images[int(torch.randint(len(images), (1,), generator=generator))]
    h, w = img.shape[-2:]
    top = int(torch.randint(h - crop + 1, (1,), generator=generator))
    left = int(torch.randint(w - crop + 1, (1,), generator=generator))
    return img[:, top : top + crop, left : left + crop]
