"""NIRNet's imprint simulator (training side): band statistics, the fused sampler, residual sources."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from streamguard.evaluation.datasets import FAKE, REAL, load_samples
from streamguard.training.nirnet.autoencoder import AutoencoderConfig, train_autoencoder
from streamguard.training.nirnet.groups import FitLimits, fit_groups, native_crop, pooled_groups, read_crops
from streamguard.training.nirnet.imprint import (
    DEFAULT_EDGES,
    ImprintSimulator,
    ImprintStats,
    describe_imprints,
    fit_imprint,
    imprints_from_json,
    imprints_to_json,
    laplace_noise,
    load_imprints,
    save_imprints,
    split_bands,
)
from streamguard.training.nirnet.residuals import (
    AutoencoderResidual,
    DenoiserResidual,
    ResidualSource,
    VaeResidual,
    VaeUnavailable,
)

BANDS = len(DEFAULT_EDGES) - 1


def _stats(scales: list[list[float]], residual: str = "test") -> ImprintStats:
    return ImprintStats(residual, DEFAULT_EDGES, tuple(tuple(row) for row in scales), 1)


def _flat(value: float) -> ImprintStats:
    return _stats([[value] * 3 for _ in range(BANDS)])


def _band_fractions(size: int) -> np.ndarray:
    """Share of the full 2-D spectrum's bins in each band (white noise's share of energy)."""
    f = np.fft.fftfreq(size)
    rho = np.hypot(f[:, None], f[None, :])
    return np.array([np.mean((rho >= lo) & (rho < hi)) for lo, hi in zip(DEFAULT_EDGES, DEFAULT_EDGES[1:])])


def _smooth_images(count: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0.5, 2.0, 3)
        base = 0.5 + 0.3 * np.sin(2 * np.pi * (a * xx + b * yy) + c)
        images.append(np.stack([base, base[::-1], base.T]))
    return torch.tensor(np.array(images), dtype=torch.float32)


def test_bands_partition_the_spectrum() -> None:
    x = torch.randn(2, 3, 24, 31, generator=torch.Generator().manual_seed(0))
    bands = split_bands(x)
    assert bands.shape == (BANDS, 2, 3, 24, 31)
    assert torch.allclose(bands.sum(0), x, atol=1e-5)
    # Each band holds its own frequencies: a pure high-frequency checkerboard lives in the last band only.
    checker = torch.tensor([[(-1.0) ** (i + j) for j in range(32)] for i in range(32)])
    parts = split_bands(checker)
    assert torch.allclose(parts[-1], checker, atol=1e-5)
    assert parts[:-1].abs().max() < 1e-5


def test_fit_is_the_laplace_mle_per_channel() -> None:
    """With one band covering the spectrum, the fit is b = mean |r|: true Laplace data gives back its scales."""
    scales = torch.tensor([0.01, 0.05, 0.2])
    r = laplace_noise((8, 3, 48, 48), torch.Generator().manual_seed(1)) * scales[:, None, None]
    fitted = fit_imprint(r, "synthetic", edges=(0.0, 0.75))
    assert fitted.images == 8
    assert np.allclose(fitted.scales[0], scales.numpy(), rtol=0.03)


def test_fit_recovers_known_band_scales() -> None:
    """White Laplace noise of scale s splits into bands of variance 2 s^2 * (share of bins); each band is a
    sum of many sinusoids, near Gaussian, so its mean |.| is 2 s sqrt(share / pi)."""
    scales = np.array([0.02, 0.05, 0.1])
    r = laplace_noise((16, 3, 64, 64), torch.Generator().manual_seed(2)) * torch.tensor(scales)[:, None, None].float()
    fitted = np.array(fit_imprint(list(r), "white").scales)  # an iterable of (C, H, W) works too
    expected = 2 * np.sqrt(_band_fractions(64) / math.pi)[:, None] * scales[None, :]
    assert fitted.shape == (BANDS, 3)
    assert np.allclose(fitted, expected, rtol=0.06)
    # and the fit tells the bands apart: these shares differ by more than the tolerance
    assert len({round(v, 3) for v in fitted[:, 0]}) == BANDS


def test_single_source_samples_reproduce_its_band_scales() -> None:
    scales = [[0.002 * (b + 1) * (c + 1) for c in range(3)] for b in range(BANDS)]
    sim = ImprintSimulator({"gen": _stats(scales)}, jitter=(1.0, 1.0), seed=3)
    noise = sim.sample((4, 3, 48, 64))
    assert noise.shape == (4, 3, 48, 64)
    assert np.allclose(fit_imprint(noise).scales, scales, rtol=1e-3)
    for image in noise:  # exactly per image, not only on average
        assert np.allclose(fit_imprint(image[None]).scales, scales, rtol=1e-3)


def test_samples_are_band_shaped() -> None:
    only_top = [[0.0] * 3 for _ in range(BANDS - 1)] + [[0.05] * 3]
    noise = ImprintSimulator({"grid": _stats(only_top)}, jitter=(1.0, 1.0)).sample((2, 3, 32, 32))
    assert noise.abs().mean() > 0.01
    assert split_bands(noise)[:-1].abs().max() < 1e-5


def test_dirichlet_mixing_lies_between_sources_and_varies() -> None:
    low, high = 0.001, 0.05
    sim = ImprintSimulator({"a": _flat(low), "b": _flat(high)}, alpha=1.0, jitter=(1.0, 1.0), seed=4)
    noise = sim.sample((12, 3, 32, 32))
    per_image = np.array([fit_imprint(n[None]).scales for n in noise])  # (N, B, C)
    assert per_image.min() >= low * 0.999 and per_image.max() <= high * 1.001
    means = per_image.mean(axis=(1, 2))
    assert means.std() > 0.005  # a new mix per draw, not one fixed average
    # one mix per image: all bands and channels of an image share its weights
    assert np.allclose(per_image.std(axis=(1, 2)), 0, atol=1e-5)


def test_seeded_sampling_is_reproducible() -> None:
    sources = {"a": _flat(0.01), "b": _flat(0.03)}
    first = ImprintSimulator(sources, seed=7).sample((2, 3, 16, 16))
    again = ImprintSimulator(sources, seed=7).sample((2, 3, 16, 16))
    other = ImprintSimulator(sources, seed=8).sample((2, 3, 16, 16))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    sim = ImprintSimulator(sources)
    assert torch.equal(sim.sample((1, 3, 16, 16), torch.Generator().manual_seed(5)),
                       sim.sample((1, 3, 16, 16), torch.Generator().manual_seed(5)))


def test_jitter_range_is_respected_per_band() -> None:
    base = 0.02
    sim = ImprintSimulator({"gen": _flat(base)}, jitter=(0.7, 1.3), seed=6)
    noise = sim.sample((32, 3, 32, 32))
    ratios = np.array([fit_imprint(n[None]).scales for n in noise]) / base  # (N, B, C)
    assert ratios.min() >= 0.7 - 1e-3 and ratios.max() <= 1.3 + 1e-3
    assert ratios.min() < 0.75 and ratios.max() > 1.25  # the range is used, not only its middle
    assert np.allclose(ratios.std(axis=2), 0, atol=1e-4)  # one factor per band, shared by the channels
    assert ratios.std(axis=1).mean() > 0.05  # bands jitter independently: the spectrum's shape moves


def test_imprint_keeps_the_content() -> None:
    real = _smooth_images(3, 32, seed=0)
    real[0, :, :8, :8] = 1.0  # saturated corners, where clamping must act
    real[1, :, :8, :8] = 0.0
    sim = ImprintSimulator({"a": _flat(0.02), "b": _flat(0.06)}, seed=9)
    noise = sim.sample(real.shape, torch.Generator().manual_seed(11))
    fake = sim.imprint(real, torch.Generator().manual_seed(11))
    assert fake.shape == real.shape and fake.dtype == real.dtype
    assert fake.min() >= 0.0 and fake.max() <= 1.0
    assert torch.allclose(fake, (real + noise).clamp(0, 1), atol=1e-6)
    inside = ((real + noise) > 0) & ((real + noise) < 1)
    assert inside.float().mean() > 0.9
    assert torch.allclose((fake - real)[inside], noise[inside], atol=1e-6)
    assert (fake - real).abs().mean() > 0.01


def test_denoiser_residual_is_small_on_smooth_images_and_edges_large_on_noise() -> None:
    source: ResidualSource = DenoiserResidual()
    assert isinstance(source, ResidualSource) and source.name == "denoiser-median3"
    smooth = _smooth_images(2, 64, seed=1)
    assert source.residual(smooth).shape == smooth.shape
    assert source.residual(smooth).abs().mean() < 0.003
    step = torch.zeros(1, 3, 32, 32)
    step[..., 16:] = 1.0
    assert source.residual(step).abs().max() == 0  # edges are content: they stay out of the residual
    white = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert source.residual(white).abs().mean() > 0.1


def test_autoencoder_trains_and_gives_residuals_at_any_size() -> None:
    grain = 0.05 * torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = list(_smooth_images(4, 32, seed=2) + grain)
    config = AutoencoderConfig(factor=4, width=8)
    trained = train_autoencoder(images, steps=40, seed=0, config=config, crop=16, batch_size=4, lr=1e-2)
    assert len(trained.losses) == 40
    assert np.mean(trained.losses[-5:]) < 0.6 * np.mean(trained.losses[:5])
    again = train_autoencoder(images, steps=3, seed=0, config=config, crop=16, batch_size=4, lr=1e-2)
    assert again.losses == trained.losses[:3]
    source = AutoencoderResidual(trained.model, label="test")
    assert source.name == "autoencoder-x4-w8-z4-test"
    x = torch.rand(1, 3, 18, 22)
    r = source.residual(x)
    assert r.shape == x.shape and r.abs().mean() > 0
    with pytest.raises(ValueError, match="at least 64x64"):
        train_autoencoder(images, steps=1)
    with pytest.raises(ValueError, match="power of two"):
        AutoencoderConfig(factor=6)


def test_vae_residual_without_weights_or_library_says_what_is_missing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(VaeUnavailable, match="not found"):
        VaeResidual(tmp_path / "nope")
    with pytest.raises(VaeUnavailable, match="config.json"):
        VaeResidual(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"0")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import fails as when it is not installed
    with pytest.raises(VaeUnavailable, match="pip install diffusers"):
        VaeResidual(tmp_path)


def save_tiny_vae(path: Path) -> Any:
    """A tiny AutoencoderKL (x2 downsampling, 4 latent channels) saved the diffusers way at ``path``; the
    `vae` extra, installed by `make test`, provides diffusers. Returns the model."""
    import diffusers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        ).eval()
    vae.save_pretrained(path, safe_serialization=True)
    return vae


def test_vae_residual_through_a_tiny_real_vae(tmp_path: Path) -> None:
    vae = save_tiny_vae(tmp_path / "tiny-vae")
    x = torch.rand(2, 3, 17, 20, generator=torch.Generator().manual_seed(0))
    source = VaeResidual(tmp_path / "tiny-vae")
    by_file = VaeResidual(tmp_path / "tiny-vae" / "diffusion_pytorch_model.safetensors")
    assert source.name.startswith("vae-tiny-vae-") and by_file.name.endswith(source.name[-12:])
    r = source.residual(x)
    assert r.shape == x.shape and r.abs().mean() > 0
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, 0, 0, 1), mode="reflect") * 2 - 1
        out = (vae.decode(vae.encode(padded).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2
    assert torch.allclose(r, x - out[..., :17, :20], atol=1e-5)
    assert torch.equal(by_file.residual(x), r)


def test_stats_json_round_trip(tmp_path: Path) -> None:
    stats = {"ldm": _stats([[0.1 / (b + 1), 0.2 / 3, 1 / 7] for b in range(BANDS)], "denoiser-median3"),
             "gan": _flat(0.0123456789)}
    assert imprints_from_json(imprints_to_json(stats)) == stats
    assert load_imprints(save_imprints(tmp_path / "imprints.json", stats)) == stats
    with pytest.raises(ValueError, match="format"):
        imprints_from_json('{"format": "other", "sources": {}}')
    with pytest.raises(ValueError, match="bands x channels"):
        ImprintStats("x", DEFAULT_EDGES, ((0.1, 0.1, 0.1),), 1)
    with pytest.raises(ValueError, match="other bands"):
        ImprintSimulator({"a": _flat(0.1), "b": ImprintStats("x", (0.0, 0.75), ((0.1, 0.1, 0.1),), 1)})


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(3):
        smooth = (_smooth_images(1, 48, seed=i)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        _save(smooth, root / "ai" / "smoothgan" / f"{i}.png")
        _save(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8), root / "ai" / "noisydiff" / f"{i}.png")
        _save(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), root / "real" / "photos" / f"{i}.png")
    (root / "ai" / "broken").mkdir()
    (root / "ai" / "broken" / "bad.png").write_bytes(b"not a png")
    return root


def test_fit_groups_from_a_dataset_on_disk(tmp_path: Path) -> None:
    samples = load_samples([_dataset(tmp_path)])
    stats = fit_groups(samples, DenoiserResidual(), FitLimits(max_per_group=2, crop=32), seed=0)
    assert set(stats) == {"smoothgan", "noisydiff"}  # reals ignored, an unreadable group left out
    assert all(s.images == 2 and s.residual == "denoiser-median3" for s in stats.values())
    assert stats["noisydiff"].scales[-1][0] > 20 * stats["smoothgan"].scales[-1][0]
    assert fit_groups(samples, DenoiserResidual(), FitLimits(max_per_group=2, crop=32), seed=0) == stats
    pooled = fit_groups(samples, DenoiserResidual(), FitLimits(crop=32), group_of=pooled_groups(samples, 2))
    assert set(pooled) == {"smoothgan", "noisydiff"}  # "broken" pooled into "unknown-pooled", still unreadable
    assert pooled["noisydiff"].images == 3
    card = describe_imprints(stats)
    assert "denoiser-median3" in card and "| noisydiff | denoiser-median3 | 2 |" in card


def test_an_autoencoder_imprint_from_any_images_of_a_dataset(tmp_path: Path) -> None:
    samples = load_samples([_dataset(tmp_path)])
    crops = [pixels for _, pixels in read_crops(samples, 32, seed=1)]
    assert len(crops) == 9 and all(c.shape == (3, 32, 32) for c in crops)  # the unreadable one skipped
    trained = train_autoencoder(crops, steps=2, config=AutoencoderConfig(width=4), crop=16, batch_size=2)
    source = AutoencoderResidual(trained.model)
    stats = fit_groups(samples, source, FitLimits(max_per_group=5, crop=32), labels=(REAL, FAKE),
                       group_of=lambda s: source.name)
    assert list(stats) == [source.name] and stats[source.name].images == 5
    assert stats[source.name].residual == "autoencoder-x4-w4-z4"


def test_native_crop_takes_pixels_as_they_are() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (40, 72, 3), dtype=np.uint8)
    crop = native_crop(Image.fromarray(pixels), 32, random.Random(0))
    assert crop.shape == (3, 32, 32)
    window = (crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    hits = [(t, l) for t in range(9) for l in range(41) if np.array_equal(pixels[t : t + 32, l : l + 32], window)]
    assert len(hits) == 1  # a window of the original, not a resampled image
    assert native_crop(Image.fromarray(pixels[:20]), 32, random.Random(0)).shape == (3, 20, 32)
