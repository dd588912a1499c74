"""Night-mode twins for the real class: real training photos as a phone's night mode would have returned them.

A phone at night collects few photons, merges a burst, denoises hard, lifts the shadows and sharpens: the
result is smooth, saturated and glowing, which a CLIP probe trained on daylight photos against generations
reads as generated. Under leave-one-source-out one night photo (light effects, 0.946) set `ai_threshold`
under the 2% rule, and carried to a left-out source the rule flagged 1 of 14 night photos (docs/validation.md
step 25). The twins give the real class that processing on scenes it already holds: each chosen photo is
darkened in linear light and given shot and read noise, then put through a night mode's tone curve, bloom,
denoise, colour and sharpening, and saved as a phone saves (JPEG q85-95). A twin keeps its photo's source (`twins`).

What a twin draws is seeded by its photo's bytes, so every fold and augmentation draw sees the same twin.

Measured, not shipped (docs/validation.md step 27): 150 twins rank no better under LOSO (-0.003 paired) and
decide better only because the one night photo that set the threshold scores lower.
"""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

# In the embedding cache key and the LOSO folds' settings: a changed recipe must never read these rows.
NIGHT_VERSION = 1
# Twins are made at most this size (shortest side): the training augmentation rescales to 160-512 px anyway,
# and a 12-megapixel photo's noise would cost seconds for nothing.
MAX_SIDE = 768


class NightMode:
    """Real photo bytes -> the bytes of its night-mode twin (JPEG, shortest side at most ``MAX_SIDE``)."""

    version = f"night-mode-{NIGHT_VERSION}"
    suffix = "#night"

    def __call__(self, data: bytes) -> bytes:
        rng = random.Random(hashlib.sha256(data).hexdigest())
        noise = np.random.default_rng(rng.getrandbits(64))
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # a JPEG decodes at a fraction of its size when that suffices
        image = image.convert("RGB")
        scale = MAX_SIDE / min(image.size)
        if scale < 1:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
        linear = (np.asarray(image, np.float32) / 255.0) ** 2.2
        if rng.random() < 0.5:  # sodium or tungsten street light: a warm cast
            linear *= np.asarray([1.0, rng.uniform(0.7, 0.9), rng.uniform(0.4, 0.7)], np.float32)
        # Photons at the sensor: a scene a few stops under daylight on a small full well, a burst of frames
        # merged (their noise falls with the square root of the frames, as if the well were that much deeper).
        exposure = rng.uniform(0.03, 0.15)
        electrons = rng.uniform(1_000, 4_000) * rng.choice((1, 4, 8))
        signal = noise.poisson(linear * exposure * electrons).astype(np.float32)
        signal += noise.normal(0.0, rng.uniform(2.0, 6.0), signal.shape).astype(np.float32)
        # The night mode's gain and tone curve keep the scene dark (it is night) but lift its shadows; lamps and
        # bright surfaces bloom through the lens and the merge.
        gained = np.clip(signal / (exposure * electrons) * rng.uniform(0.15, 0.6), 0.0, 1.0)
        tone = gained ** (1.0 / (2.2 * rng.uniform(1.1, 1.6)))
        if rng.random() < 0.5:
            highlights = Image.fromarray((np.clip(tone - 0.6, 0.0, 1.0) * 255.0 / 0.4).round().astype(np.uint8))
            blur = ImageFilter.GaussianBlur(min(tone.shape[:2]) / rng.uniform(20, 60))
            bloom = np.asarray(highlights.filter(blur), np.float32) / 255.0
            tone = np.clip(tone + rng.uniform(0.2, 0.5) * bloom, 0.0, 1.0)
        night = Image.fromarray((tone * 255.0).round().astype(np.uint8))
        # Denoise as phones do: hard on colour, gentler on brightness, where it would erase the detail.
        y, cb, cr = night.convert("YCbCr").split()
        chroma = ImageFilter.GaussianBlur(rng.uniform(1.5, 3.0))
        y = y.filter(ImageFilter.MedianFilter(3)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
        night = Image.merge("YCbCr", (y, cb.filter(chroma), cr.filter(chroma))).convert("RGB")
        night = ImageEnhance.Color(night).enhance(rng.uniform(1.1, 1.4))
        night = night.filter(ImageFilter.UnsharpMask(radius=rng.uniform(1.0, 2.0), percent=rng.randint(80, 160),
                                                     threshold=1))
        out = io.BytesIO()
        night.save(out, format="JPEG", quality=rng.randint(85, 95))
        return out.getvalue()
