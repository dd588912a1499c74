"""Imprint statistics and the simulator that turns real images into content-matched "fake" ones.

A residual is split into radial frequency bands (`split_bands`, the one decomposition both fitting and
sampling use); each band of each channel gets a zero-mean Laplace scale b = mean |r_band| (its maximum
likelihood estimate). The simulator mixes several sources' scales with Dirichlet weights, jitters them, and
shapes white Laplace noise into each band at the mixed scale.

Scales are per pixel, and a band is a fixed range of cycles per pixel, so statistics fitted on 256 px crops
apply to images of other sizes: the share of a broadband residual's energy in a band does not depend on
the image's size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

# Radial frequency in cycles per pixel; the last edge lies past the corner (|f| <= sqrt(0.5)) so the bands
# cover the whole spectrum. Octaves at the bottom, finer steps at the top where generators differ: a x2
# upsampler's grid peaks at the corners (0.5, 0.5) and lands alone in the last band, a x8 VAE's period-8
# texture at 1/8 and its harmonics in the middle ones.
DEFAULT_EDGES: tuple[float, ...] = (0.0, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 0.75)
FORMAT = "streamguard-nirnet-imprints/1"


def _check_edges(edges: Sequence[float]) -> None:
    if len(edges) < 2 or edges[0] != 0.0 or edges[-1] <= math.sqrt(0.5) or any(a >= b for a, b in pairwise(edges)):
        raise ValueError(f"band edges must rise from 0 to past sqrt(0.5) cycles/pixel, got {tuple(edges)}")


def band_masks(height: int, width: int, edges: Sequence[float] = DEFAULT_EDGES,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(bands, height, width // 2 + 1) 0/1 masks over ``rfft2``'s half spectrum; they partition it."""
    _check_edges(edges)
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    rho = torch.sqrt(fy * fy + fx * fx)
    return torch.stack([((rho >= lo) & (rho < hi)).float() for lo, hi in pairwise(edges)])


def split_bands(x: torch.Tensor, edges: Sequence[float] = DEFAULT_EDGES) -> torch.Tensor:
    """x (..., H, W) -> (bands, ..., H, W), band-pass components that sum back to x."""
    h, w = x.shape[-2:]
    spectrum = torch.fft.rfft2(x)
    masks = band_masks(h, w, edges, x.device)
    return torch.stack([torch.fft.irfft2(spectrum * m, s=(h, w)) for m in masks])


@dataclass(frozen=True)
class ImprintStats:
    """One source's imprint: ``scales[band][channel]``, the zero-mean Laplace scale of that band."""

    residual: str  # the ResidualSource that measured it: the model card names it
    edges: tuple[float, ...]
    scales: tuple[tuple[float, ...], ...]
    images: int  # how many residual images were fitted

    def __post_init__(self) -> None:
        _check_edges(self.edges)
        if len(self.scales) != len(self.edges) - 1 or len({len(row) for row in self.scales}) != 1:
            raise ValueError(f"scales must be bands x channels for {len(self.edges) - 1} bands")

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.scales, dtype=torch.float64)

    def to_dict(self) -> dict[str, object]:
        return {"residual": self.residual, "edges": list(self.edges), "scales": [list(r) for r in self.scales],
                "images": self.images}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ImprintStats:
        edges = data["edges"]
        scales = data["scales"]
        assert isinstance(edges, list) and isinstance(scales, list)
        return cls(str(data["residual"]), tuple(float(e) for e in edges),
                   tuple(tuple(float(v) for v in row) for row in scales), int(str(data["images"])))


class ScaleFit:
    """Accumulates mean |r_band| per band and channel over residuals of any sizes (float64 sums)."""

    def __init__(self, edges: Sequence[float] = DEFAULT_EDGES) -> None:
        _check_edges(edges)
        self.edges = tuple(float(e) for e in edges)
        self._abs: torch.Tensor | None = None
        self._pixels = 0
        self.images = 0

    def add(self, residual: torch.Tensor) -> None:
        """residual (N, C, H, W) or (C, H, W)."""
        r = residual if residual.dim() == 4 else residual[None]
        bands = split_bands(r.double(), self.edges)  # (B, N, C, H, W)
        sums = bands.abs().sum(dim=(1, 3, 4))
        self._abs = sums if self._abs is None else self._abs + sums
        self._pixels += r.shape[0] * r.shape[-2] * r.shape[-1]
        self.images += r.shape[0]

    def result(self, residual: str) -> ImprintStats:
        if self._abs is None:
            raise ValueError("no residuals to fit")
        scales = (self._abs / self._pixels).tolist()
        return ImprintStats(residual, self.edges, tuple(tuple(row) for row in scales), self.images)


def fit_imprint(residuals: torch.Tensor | Iterable[torch.Tensor], residual: str = "unknown",
                edges: Sequence[float] = DEFAULT_EDGES) -> ImprintStats:
    """Zero-mean Laplace scales (b = mean |r_band|, the MLE) of one source's residuals.

    ``residuals``: one (N, C, H, W) tensor, or an iterable of (C, H, W) / (N, C, H, W) tensors of any sizes.
    """
    fit = ScaleFit(edges)
    for r in [residuals] if isinstance(residuals, torch.Tensor) else residuals:
        fit.add(r)
    return fit.result(residual)


def laplace_noise(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit-scale zero-mean Laplace samples by the inverse CDF (torch's Laplace takes no generator)."""
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2.0 * u.abs()).clamp_min(-50.0)).to(dtype)


class ImprintSimulator:
    """Band-shaped noise from a Dirichlet fusion of several sources' imprints.

    Per image: weights w ~ Dirichlet(alpha) over the sources; mixed scales sum_k w_k b_k (a convex
    combination: the image gets one coherent imprint between the known generators, not a per-pixel
    patchwork of theirs); then each band's scale is multiplied by its own factor from ``jitter``, which
    changes the spectrum's shape as well as its strength, to reach past the known generators.
    """

    def __init__(self, stats_by_source: Mapping[str, ImprintStats], alpha: float = 1.0,
                 jitter: tuple[float, float] = (0.7, 1.3), seed: int = 0) -> None:
        if not stats_by_source:
            raise ValueError("need the imprint of at least one source")
        if alpha <= 0 or not 0 < jitter[0] <= jitter[1]:
            raise ValueError(f"need alpha > 0 and 0 < jitter low <= high, got {alpha}, {jitter}")
        self.sources = sorted(stats_by_source)
        first = stats_by_source[self.sources[0]]
        mismatched = [s for s in self.sources if stats_by_source[s].edges != first.edges
                      or len(stats_by_source[s].scales[0]) != len(first.scales[0])]
        if mismatched:
            raise ValueError(f"sources {mismatched} were fitted with other bands or channels than {self.sources[0]}")
        self.edges = first.edges
        self.alpha = alpha
        self.jitter = jitter
        self._scales = torch.stack([stats_by_source[s].tensor() for s in self.sources])  # (K, B, C)
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def channels(self) -> int:
        return int(self._scales.shape[-1])

    def target_scales(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(count, bands, channels) scales for ``count`` images: Dirichlet-mixed, then jittered per band."""
        # numpy draws the Dirichlet (torch's gamma sampler takes no generator), seeded from the torch one.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator or self._generator)))
        weights = torch.from_numpy(rng.dirichlet([self.alpha] * len(self.sources), size=count))  # (N, K)
        jitter = torch.from_numpy(rng.uniform(*self.jitter, size=(count, self._scales.shape[1], 1)))
        return torch.einsum("nk,kbc->nbc", weights, self._scales) * jitter

    def sample(self, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise of ``shape`` (N, C, H, W) whose band b, channel c has mean |.| = the image's target scale."""
        n, c = int(shape[0]), int(shape[1])
        if c != self.channels:
            raise ValueError(f"imprints have {self.channels} channels, asked for {c}")
        generator = generator or self._generator
        targets = self.target_scales(n, generator)
        bands = split_bands(laplace_noise(shape, generator), self.edges)  # (B, N, C, H, W)
        # Band-passing white Laplace noise averages many samples: each band comes out closer to Gaussian.
        # What is matched is the fitted statistic itself, each band's mean |.|, exactly for every image.
        current = bands.abs().mean(dim=(-2, -1)).double()
        gain = (targets.permute(1, 0, 2) / current.clamp_min(1e-12)).float()
        return (bands * gain[..., None, None]).sum(dim=0)

    def imprint(self, real_images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Content-matched fakes: real_images (N, C, H, W) in [0, 1] plus sampled noise, clamped to [0, 1]."""
        noise = self.sample(real_images.shape, generator).to(real_images.device, real_images.dtype)
        return (real_images + noise).clamp(0.0, 1.0)


def imprints_to_json(stats_by_source: Mapping[str, ImprintStats]) -> str:
    return json.dumps({"format": FORMAT, "sources": {k: stats_by_source[k].to_dict() for k in sorted(stats_by_source)}},
                      indent=1) + "\n"


def imprints_from_json(text: str) -> dict[str, ImprintStats]:
    payload = json.loads(text)
    if payload.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (format {payload.get('format')!r})")
    return {name: ImprintStats.from_dict(data) for name, data in payload["sources"].items()}


def save_imprints(path: Path, stats_by_source: Mapping[str, ImprintStats]) -> Path:
    path.write_text(imprints_to_json(stats_by_source))
    return path


def load_imprints(path: Path) -> dict[str, ImprintStats]:
    return imprints_from_json(path.read_text())


def describe_imprints(stats_by_source: Mapping[str, ImprintStats]) -> str:
    """The model card's paragraph: which residual source(s) the simulator's statistics came from."""
    if not stats_by_source:
        raise ValueError("no imprint statistics to describe")
    residuals = sorted({s.residual for s in stats_by_source.values()})
    lines = [f"Imprint simulator statistics measured with: {', '.join(residuals)}.",
             f"Bands (cycles/pixel): {', '.join(f'{e:g}' for e in next(iter(stats_by_source.values())).edges)}.",
             "", "| source | residual | images |", "|---|---|---|"]
    lines += [f"| {name} | {s.residual} | {s.images} |" for name, s in sorted(stats_by_source.items())]
    return "\n".join(lines) + "\n"
