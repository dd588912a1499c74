"""PDQ hashing: the hash's shape, its hex form, and that it is stable where it should be."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from streamguard.dedupe.phash import PerceptualHash, from_hex, hamming, perceptual_hash, to_hex


def gradient(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 120 * np.sin(x / w * 5 + rng.uniform(0, 3))
    g = 127 + 120 * np.cos(y / h * 4 + rng.uniform(0, 3))
    b = 127 + 120 * np.sin((x + y) / (w + h) * 7)
    noisy = np.stack([r, g, b], -1) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_hash_is_32_bytes_with_a_quality() -> None:
    phash = perceptual_hash(gradient((300, 200)))
    assert len(phash.bits) == 32 and phash.quality >= 50
    assert perceptual_hash(gradient((300, 200))) == phash


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK"])
def test_any_mode_hashes_like_its_rgb(mode: str) -> None:
    img = gradient((256, 256))
    assert hamming(perceptual_hash(img.convert(mode)), perceptual_hash(img)) <= 31


def test_large_images_hash_like_their_smaller_copies() -> None:
    big = gradient((2400, 1600))
    assert hamming(perceptual_hash(big), perceptual_hash(big.resize((600, 400)))) <= 31


def test_flat_images_have_low_quality() -> None:
    assert perceptual_hash(Image.new("RGB", (100, 100), (10, 200, 40))).quality < 50


@given(st.binary(min_size=32, max_size=32), st.integers(0, 100))
def test_hex_round_trip(bits: bytes, quality: int) -> None:
    phash = PerceptualHash(bits=bits, quality=quality)
    text = to_hex(phash)
    assert len(text) == 64 and from_hex(text, quality) == phash


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_hamming_is_a_bit_count(a: bytes, b: bytes) -> None:
    ha, hb = PerceptualHash(bits=a, quality=100), PerceptualHash(bits=b, quality=100)
    xor = bytes(x ^ y for x, y in zip(a, b, strict=True))
    expected = int(np.unpackbits(np.frombuffer(xor, np.uint8)).sum())
    assert hamming(ha, hb) == hamming(hb, ha) == expected
    assert hamming(ha, ha) == 0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        PerceptualHash(bits=b"\x00" * 31, quality=100)
    with pytest.raises(ValueError, match="not a hex PDQ hash"):
        from_hex("zz" * 32, 100)
    with pytest.raises(ValueError):
        from_hex("00" * 31, 100)
