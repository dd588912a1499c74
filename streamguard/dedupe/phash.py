"""Perceptual hashing for near-duplicate detection: PDQ, the hash the industry shares (Meta's
ThreatExchange, StopNCII, GIFCT).

A PDQ hash is 256 bits plus a quality score in 0..100. By convention two images match when their hashes
differ in at most 31 bits, and hashes of quality below 50 (flat, near-featureless images) are not used:
they collide with unrelated content.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pdqhash
from PIL import Image

HASH_BYTES = 32
HASH_BITS = HASH_BYTES * 8

# PDQ filters the image down to 64x64 anyway; hashing a 12-megapixel original costs about 1.5 s against
# 15 ms at 512 px, and the hash barely moves.
_MAX_SIDE = 512


@dataclass(frozen=True)
class PerceptualHash:
    """256 PDQ bits, most significant bit first, and PDQ's quality score (0..100)."""

    bits: bytes
    quality: int

    def __post_init__(self) -> None:
        if len(self.bits) != HASH_BYTES:
            raise ValueError(f"a PDQ hash has {HASH_BYTES} bytes, not {len(self.bits)}")


def perceptual_hash(img: Image.Image) -> PerceptualHash:
    """The PDQ hash of an image (any mode; alpha is dropped)."""
    rgb = img.convert("RGB")
    if max(rgb.size) > _MAX_SIDE:
        rgb.thumbnail((_MAX_SIDE, _MAX_SIDE), Image.Resampling.BILINEAR)
    vector, quality = pdqhash.compute(np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)))
    bits = np.packbits(np.asarray(vector, dtype=np.uint8)).tobytes()
    return PerceptualHash(bits=bits, quality=int(quality))


def bit_distance(a: bytes, b: bytes) -> int:
    """Number of differing bits between two equally long byte strings."""
    if len(a) != len(b):
        raise ValueError("hashes of different lengths")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()


def hamming(a: PerceptualHash, b: PerceptualHash) -> int:
    return bit_distance(a.bits, b.bits)


def to_hex(h: PerceptualHash) -> str:
    """64 hex digits, first bit of pdqhash's vector most significant, as python-threatexchange writes them.
    The quality is not part of it."""
    return h.bits.hex()


def from_hex(text: str, quality: int) -> PerceptualHash:
    """Parse the hex form; the quality is not part of it, so the caller states what it knows."""
    try:
        bits = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"not a hex PDQ hash: {text!r}") from None
    return PerceptualHash(bits=bits, quality=quality)
