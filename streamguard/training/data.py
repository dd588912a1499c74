"""Training data: splits and held-out groups, the shared augmentation, and batches for the loop.

Both classes go through the same augmentation (`augment`, which UnivFD's training uses too): the
post-processing real photos meet on a platform (phone-style denoise, sharpening, a screenshot's lossless
re-save), shortest side rescaled to 160-512 px, then JPEG at quality 60-95. Seeded per sample and per
augmentation variant: epoch e trains on variant ``e mod variants``, so each image is seen under a few
different rescalings and qualities while the prefix cache stays finite. Validation and test use variant 0.

Hold-outs (leave-one-source-out validation): samples of a held-out generator (fakes) or source (any label)
leave train and val whatever their split, and are reported as test together with the usual test split of
the rest, so a held-out generator is scored against real images the model never trained on.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import structlog
import torch
from PIL import Image, ImageFilter

from streamguard.builtin.cliphead import CONTRACT
from streamguard.config import IntakeSettings
from streamguard.evaluation.datasets import FAKE, Sample, SampleReader
from streamguard.intake import decode_image, prepare
from streamguard.training.model import TunedClip
from streamguard.training.mpft import texture_scores
from streamguard.training.prefix_cache import PrefixCache

log = structlog.get_logger(__name__)

NO_AUGMENTATION = "none"


# Part of every cache key of augmented inputs: a changed recipe must never read the old recipe's pixels.
AUGMENT_VERSION = 2


def augment(data: bytes, rng: random.Random, native_jpeg: bool = False, mirror: bool = False) -> bytes:
    """The same for both classes, so no class-specific processing is left to learn.

    Real photos reach a platform denoised by a phone, sharpened by an editor or re-saved as a screenshot;
    generated images reach it the same ways. Without these in training, a detector learns that a smoothed
    or sharpened texture means "generated" and flags exactly the phone photos and portraits it never saw.

    ``native_jpeg``: half of the images are also re-encoded as JPEG (quality 60-95) at their own size, after
    any denoise or sharpening and before the rescale, as an upload pipeline re-encodes an edited image; the
    last JPEG only ever comes after the rescale, where its blocks land on other pixels than a native one's.

    ``mirror``: half of the images are also mirrored left to right, so the model hears each picture both ways
    round (a probe on CLIP's class tokens reads a picture and its mirror image a little differently).
    """
    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGB")
    post = rng.random()
    if post < 0.2:
        img = img.filter(ImageFilter.MedianFilter(3))  # phone-style noise reduction
    elif post < 0.4:
        img = img.filter(ImageFilter.UnsharpMask(radius=rng.uniform(0.8, 2.0), percent=rng.randint(50, 150),
                                                 threshold=2))
    side = rng.randint(160, 512)
    quality = rng.randint(60, 95)
    screenshot = rng.random() < 0.1
    # Drawn after the rest, so that without it every image keeps the draw it had (AUGMENT_VERSION 2).
    if native_jpeg and rng.random() < 0.5:
        native = io.BytesIO()
        img.save(native, format="JPEG", quality=rng.randint(60, 95))
        img = Image.open(native).convert("RGB")
    # Drawn last for the same reason: without it, and with it on the images it leaves, nothing else moves.
    if mirror and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = side / min(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if screenshot:
        img.save(out, format="PNG")  # a screenshot: rescaled, then lossless
    else:
        img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@dataclass(frozen=True)
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    held_out: list[Sample]


def is_held_out(sample: Sample, generators: Iterable[str], sources: Iterable[str]) -> bool:
    return (sample.label == FAKE and sample.generator in set(generators)) or sample.source in set(sources)


def split_samples(samples: Sequence[Sample], holdout_generators: Sequence[str] = (),
                  holdout_sources: Sequence[str] = ()) -> Splits:
    """Raises ValueError for a held-out name that no sample has (a typo would silently hold out nothing)."""
    generators = {s.generator for s in samples if s.label == FAKE}
    sources = {s.source for s in samples}
    unknown = [g for g in holdout_generators if g not in generators] + [s for s in holdout_sources if s not in sources]
    if unknown:
        raise ValueError(f"nothing to hold out for {unknown}: generators are {sorted(generators)}, "
                         f"sources {sorted(sources)}")
    held = [s for s in samples if is_held_out(s, holdout_generators, holdout_sources)]
    held_ids = {s.id for s in held}
    rest = [s for s in samples if s.id not in held_ids]
    by_split = {name: [s for s in rest if s.split == name] for name in ("train", "val", "test")}
    return Splits(by_split["train"], by_split["val"], held + by_split["test"], held)


def augmentation_key(seed: int, variant: int, augmented: bool) -> str:
    return f"a{AUGMENT_VERSION}:{seed}:{variant}" if augmented else NO_AUGMENTATION


@dataclass(frozen=True)
class Entry:
    """One training input: a sample under one augmentation."""

    sample: Sample
    augmentation: str


def prepare_pixels(data: bytes, entry: Entry, intake: IntakeSettings) -> np.ndarray:
    """The contract's normalised (3, 224, 224) pixels of ``entry``'s augmented image.

    Decoded and prepared exactly as `scan` and the worker prepare an image for the served detector.
    """
    if entry.augmentation != NO_AUGMENTATION:
        data = augment(data, random.Random(f"{entry.augmentation}:{entry.sample.id}"))
    return prepare(decode_image(data, intake, CONTRACT.size), CONTRACT)


@dataclass(frozen=True)
class Batch:
    labels: torch.Tensor  # (N,) float, 1 = fake
    texture: torch.Tensor  # (N, patches)
    hidden: torch.Tensor | None  # (N, tokens, hidden) entering the tuned blocks, when cached
    pixels: torch.Tensor | None  # (N, 3, H, W), when not


class Feed:
    """Batches for the loop, from the prefix cache when there is one, else decoded and augmented each time."""

    def __init__(self, model: TunedClip, intake: IntakeSettings, cache: PrefixCache | None, device: str,
                 batch_size: int) -> None:
        self.model = model
        self.intake = intake
        self.cache = cache
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.reader = SampleReader()

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reader.close()

    def texture(self, pixels: torch.Tensor) -> torch.Tensor:
        return texture_scores(pixels, self.model.encoder.patch_size, CONTRACT.mean, CONTRACT.std)

    def warm(self, entries: Sequence[Entry], advance: Callable[[int], None] = lambda n: None) -> list[Entry]:
        """The entries whose image decodes, in order; with a cache, every missing prefix computed and stored."""
        bad: set[Entry] = set()
        pending: list[tuple[Entry, np.ndarray]] = []
        todo = [e for e in entries if self.cache is None or not self.cache.has(e.sample.id, e.augmentation)]
        advance(len(entries) - len(todo))
        # Entries of one sample are adjacent after sorting: its bytes are read once for all its variants.
        for _, group in groupby(sorted(todo, key=lambda e: e.sample.id), key=lambda e: e.sample):
            items = list(group)
            try:
                data = self.reader.read(items[0].sample)
            except Exception as exc:  # noqa: BLE001 - one unreadable image is skipped, not fatal
                self._skip(items, exc, bad, advance)
                continue
            for entry in items:
                try:
                    pixels = prepare_pixels(data, entry, self.intake)
                except Exception as exc:  # noqa: BLE001 - decoders raise many types on bad files
                    self._skip([entry], exc, bad, advance)
                    continue
                if self.cache is None:
                    advance(1)
                    continue
                pending.append((entry, pixels))
                if len(pending) == self.batch_size:
                    self._store(pending)
                    advance(len(pending))
                    pending.clear()
        if pending:
            self._store(pending)
            advance(len(pending))
        return [e for e in entries if e not in bad]

    @staticmethod
    def _skip(entries: Sequence[Entry], exc: Exception, bad: set[Entry], advance: Callable[[int], None]) -> None:
        log.warning("train.sample_skipped", sample=entries[0].sample.id, augmentation=entries[0].augmentation,
                    error=f"{type(exc).__name__}: {exc}")
        bad.update(entries)
        advance(len(entries))

    def _store(self, pending: Sequence[tuple[Entry, np.ndarray]]) -> None:
        assert self.cache is not None
        pixels = torch.from_numpy(np.stack([p for _, p in pending])).to(self.device)
        hidden = self.model.prefix(pixels)
        texture = self.texture(pixels)
        for i, (entry, _) in enumerate(pending):
            self.cache.put(entry.sample.id, entry.augmentation, hidden[i], texture[i])

    def batch(self, entries: Sequence[Entry]) -> Batch:
        labels = torch.tensor([float(e.sample.label) for e in entries], device=self.device)
        if self.cache is not None:
            cached = [self.cache.get(e.sample.id, e.augmentation) for e in entries]
            missing = [e.sample.id for e, c in zip(entries, cached, strict=True) if c is None]
            if missing:
                raise RuntimeError(f"prefix cache entries vanished during training: {missing[:3]}")
            hidden = torch.stack([c.hidden for c in cached if c is not None]).to(self.device, torch.float32)
            texture = torch.stack([c.texture for c in cached if c is not None]).to(self.device)
            return Batch(labels, texture, hidden, None)
        arrays = [prepare_pixels(self.reader.read(e.sample), e, self.intake) for e in entries]
        pixels = torch.from_numpy(np.stack(arrays)).to(self.device)
        return Batch(labels, self.texture(pixels), None, pixels)
