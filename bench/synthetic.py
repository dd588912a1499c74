"""Images the benchmarks make themselves (benchmarks, like tests, never read ../shared/data)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A JPEG of ``size`` that compresses like a photo (smooth content plus mild noise), unlike pure noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 90.0 + seed), np.cos(y / 70.0), np.sin((x + y) / 150.0)], axis=-1) * 100 + 128
    img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
