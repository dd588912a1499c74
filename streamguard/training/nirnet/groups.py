"""Imprint statistics from a labelled dataset, on native-pixel crops.

Two uses. A denoiser's residual of a generated image holds its generator's imprint, so `fit_groups` fits
one `ImprintStats` per generator over the fakes. An autoencoder's (or a real VAE's) reconstruction error
is its own imprint whatever image goes in, so its statistics are one source fitted over any images:
``fit_groups(samples, source, labels=(REAL, FAKE), group_of=lambda s: source.name)``; `read_crops` gives
the same crops to `autoencoder.train_autoencoder`.

Bounded: at most ``max_per_group`` images per group (chosen by a seeded hash, stable when unrelated images
are added) and one crop of at most ``crop`` square per image. Never resized: a resize filters away exactly
the high frequencies the imprint lives in.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import structlog
import torch
from PIL import Image

from streamguard.config import IntakeSettings
from streamguard.evaluation.datasets import FAKE, Sample, SampleReader
from streamguard.intake import decode_image
from streamguard.training.nirnet.imprint import DEFAULT_EDGES, ImprintStats, ScaleFit
from streamguard.training.nirnet.residuals import ResidualSource

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FitLimits:
    max_per_group: int = 64
    crop: int = 256
    min_images: int = 1  # a group with fewer readable images gets no stats


def by_group(sample: Sample) -> str:
    return sample.group


def pooled_groups(samples: Sequence[Sample], min_images: int) -> Callable[[Sample], str]:
    """A grouping that pools generators with fewer than ``min_images`` fakes into ``<family>-pooled``.

    wild-more has 21 generators, many with 1-6 images: too few for stable scales alone, still worth
    their breadth when pooled with their family.
    """
    counts = Counter(s.group for s in samples if s.label == FAKE)

    def group(sample: Sample) -> str:
        return sample.group if counts[sample.group] >= min_images else f"{sample.family}-pooled"

    return group


def native_crop(image: Image.Image, size: int, rng: random.Random) -> torch.Tensor:
    """(3, h, w) in [0, 1]: a size x size window at a seeded position, or the whole side where it is shorter."""
    w, h = image.size
    cw, ch = min(size, w), min(size, h)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    pixels = np.asarray(image.crop((left, top, left + cw, top + ch)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def choose(samples: Sequence[Sample], limit: int, seed: int) -> list[Sample]:
    """At most ``limit`` samples, ranked by a seeded hash of their ids."""
    def rank(sample: Sample) -> bytes:
        return hashlib.sha256(f"nirnet:{seed}:{sample.id}".encode()).digest()

    return sorted(samples, key=rank)[:limit]


def read_crops(samples: Sequence[Sample], crop: int, seed: int = 0, reader: SampleReader | None = None,
               intake: IntakeSettings | None = None) -> Iterator[tuple[Sample, torch.Tensor]]:
    """One native crop per readable sample, in order; unreadable or degenerate (< 2 px) ones are skipped."""
    intake = intake or IntakeSettings()
    own = reader is None
    reader = reader or SampleReader()
    try:
        for sample in samples:
            try:
                image = decode_image(reader.read(sample), intake, None).rgb
            except Exception as exc:  # noqa: BLE001 - one bad file is skipped, decoders raise many types
                log.warning("nirnet.sample_skipped", sample=sample.id, error=f"{type(exc).__name__}: {exc}")
                continue
            pixels = native_crop(image, crop, random.Random(f"{seed}:{sample.id}"))
            if min(pixels.shape[-2:]) >= 2:  # reflect padding needs 2 px; a 1-px strip has no residual anyway
                yield sample, pixels
    finally:
        if own:
            reader.close()


def fit_groups(
    samples: Sequence[Sample],
    source: ResidualSource,
    limits: FitLimits | None = None,
    *,
    seed: int = 0,
    labels: Collection[int] = (FAKE,),
    group_of: Callable[[Sample], str] = by_group,
    edges: Sequence[float] = DEFAULT_EDGES,
    intake: IntakeSettings | None = None,
) -> dict[str, ImprintStats]:
    """Imprint statistics per group of the samples with one of ``labels`` (by default the generated ones)."""
    limits = limits or FitLimits()
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.label in labels:
            groups[group_of(sample)].append(sample)
    stats: dict[str, ImprintStats] = {}
    with SampleReader() as reader, torch.no_grad():
        for name in sorted(groups):
            fit = ScaleFit(edges)
            chosen = choose(groups[name], limits.max_per_group, seed)
            for _, pixels in read_crops(chosen, limits.crop, seed, reader, intake):
                fit.add(source.residual(pixels[None]))
            if fit.images < max(1, limits.min_images):
                log.info("nirnet.group_skipped", group=name, images=fit.images, min_images=limits.min_images)
                continue
            stats[name] = fit.result(source.name)
            log.info("nirnet.imprint_fitted", group=name, images=fit.images, residual=source.name)
    return stats
