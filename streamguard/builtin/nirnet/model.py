"""NIRNet's torch modules (arXiv 2503.09314): a noise-imprint extractor under a hybrid discriminator.

Pure torch, importable without training code: the trainer (`streamguard.training.nirnet`) builds, trains
and saves these with `save_model`; serving loads them with `load_model`.

Pixels in are raw RGB in [0, 1] at native resolution (crops, never resized: resizing erases the imprint).
The extractor predicts the noise (DnCNN residual learning: ``x - noise`` is the denoised image); the noise
and frequency branches read that noise map, the semantic branch a frozen CLIP embedding of the whole image.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from streamguard.builtin.nirnet.files import CONFIG_FILE, WEIGHTS_FILE, NirnetConfig

__all__ = ["FrequencyBranch", "ImprintExtractor", "NIRNet", "NirnetConfig", "NoiseBranch", "SemanticBranch",
           "load_model", "log_spectrum", "save_model"]


def _norm(kind: str, channels: int) -> nn.Module:
    # Batch norm (DnCNN's) by default: served in eval mode it is a fixed affine map, so each noise value
    # depends on its neighbourhood alone. Group norm normalises over the whole crop (a noise value then
    # depends on the rest of the crop) but trains steadily on the few large crops a batch may hold.
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ImprintExtractor(nn.Module):
    """DnCNN-style residual CNN: (N, 3, H, W) pixels -> (N, 3, H, W) noise map at the input's resolution.

    Stride 1 and padding 1 throughout, so any H, W come out unchanged; with batch norm (in eval mode) every
    output pixel is a function of its (2 * (depth + 2) + 1)-pixel neighbourhood only: the imprint is read
    locally, never averaged away."""

    def __init__(self, depth: int = 8, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), _norm(norm, width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body(pixels)

    def denoise(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels - self(pixels)


def _stem(width: int, norm: str, stages: int = 3) -> nn.Sequential:
    """Strided conv stages from 3 channels: the shared shape of the two CNN branches."""
    layers: list[nn.Module] = []
    channels = 3
    for i in range(stages):
        out = width * 2 ** min(i, 1)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), _norm(norm, out),
                   nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers)


class NoiseBranch(nn.Module):
    """CNN on the noise map -> (N, feature_dim). Mean and standard deviation pooled over positions: an
    imprint is a texture statistic, present everywhere, not an object at a place."""

    def __init__(self, width: int = 32, feature_dim: int = 64, norm: str = "batch") -> None:
        super().__init__()
        self.stem = _stem(width, norm)
        self.out = nn.Linear(4 * width, feature_dim)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        h = self.stem(noise).flatten(2)
        return self.out(torch.cat([h.mean(-1), h.std(-1, unbiased=False)], dim=1))


def log_spectrum(noise: torch.Tensor) -> torch.Tensor:
    """log(1 + |FFT|) per channel, zero frequency at the centre: (N, 3, H, W) -> (N, 3, H, W)."""
    # fft in fp32 whatever the caller runs at: half-precision FFTs are limited to power-of-two sizes.
    spectrum = torch.fft.fft2(noise.float(), norm="ortho")
    return torch.log1p(torch.fft.fftshift(spectrum, dim=(-2, -1)).abs())


class FrequencyBranch(nn.Module):
    """Log-magnitude spectrum of the noise map -> CNN -> (N, feature_dim).

    Pooled to a ``grid`` x ``grid`` map, not globally: a generator's upsampling leaves peaks at particular
    frequencies, and where a peak sits in the (centred) spectrum is the evidence. Crops have a fixed size,
    so each grid cell always covers the same frequency band."""

    def __init__(self, width: int = 32, feature_dim: int = 64, grid: int = 8, norm: str = "batch") -> None:
        super().__init__()
        self.stem = _stem(width, norm, stages=2)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out = nn.Linear(2 * width * grid * grid, feature_dim)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool(self.stem(log_spectrum(noise))).flatten(1))


class SemanticBranch(nn.Module):
    """A frozen CLIP image embedding (N, embed_dim) -> MLP -> (N, feature_dim)."""

    def __init__(self, embed_dim: int = 512, hidden_dim: int = 64, feature_dim: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, feature_dim))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        # Direction only, as CLIP's own similarity and the CLIP-head probes read it.
        return self.mlp(nn.functional.normalize(embeddings.float(), dim=-1))


class NIRNet(nn.Module):
    """Extractor + the enabled branches, concatenated -> MLP -> one logit per crop."""

    def __init__(self, config: NirnetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.extractor = ImprintExtractor(c.extractor_depth, c.extractor_width, c.norm)
        self.noise = NoiseBranch(c.branch_width, c.feature_dim, c.norm) if "noise" in c.branches else None
        self.frequency = (FrequencyBranch(c.branch_width, c.feature_dim, c.spectrum_grid, c.norm)
                          if "frequency" in c.branches else None)
        self.semantic = SemanticBranch(c.semantic_dim, c.hidden_dim, c.feature_dim) if c.semantic else None
        width = c.feature_dim * len(c.branches)
        self.head = nn.Sequential(nn.Linear(width, c.hidden_dim), nn.GELU(), nn.Linear(c.hidden_dim, 1))

    def features(self, pixels: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """The concatenated branch features (N, feature_dim * branches)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (N, 3, H, W), got {tuple(pixels.shape)}")
        parts: list[torch.Tensor] = []
        if self.noise is not None or self.frequency is not None:
            noise = self.extractor(pixels)
            if self.noise is not None:
                parts.append(self.noise(noise))
            if self.frequency is not None:
                parts.append(self.frequency(noise))
        if self.semantic is not None:
            if embeddings is None or embeddings.shape != (pixels.shape[0], self.config.semantic_dim):
                got = None if embeddings is None else tuple(embeddings.shape)
                raise ValueError(f"the semantic branch needs CLIP embeddings of shape "
                                 f"({pixels.shape[0]}, {self.config.semantic_dim}), got {got}")
            parts.append(self.semantic(embeddings))
        return torch.cat(parts, dim=1)

    def forward(self, pixels: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3, H, W) raw [0, 1] crops and, with the semantic branch, (N, semantic_dim) CLIP embeddings of
        the images they came from -> (N,) logits."""
        return self.head(self.features(pixels, embeddings)).squeeze(-1)


def save_model(model: NIRNet, out: Path, metadata: dict[str, str] | None = None) -> Path:
    """``model`` in the layout the `nirnet` plugin loads: its state and its config, side by side. What the
    trainer and the tests call, so that both write what serving reads. Returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata=dict(metadata) if metadata else None)
    (out / CONFIG_FILE).write_text(model.config.to_json())
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        (out / name).chmod(0o644)  # safetensors may write 0600; shipped weights are read by any user
    return out


def load_model(directory: Path, device: str | torch.device = "cpu") -> NIRNet:
    """The model of ``directory`` in eval mode; its state must fit its config exactly (strict)."""
    config = NirnetConfig.from_json((directory / CONFIG_FILE).read_text())
    model = NIRNet(config)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    return model.to(device).eval()
