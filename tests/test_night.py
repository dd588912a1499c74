"""Night-mode twins in univfd's real class (`streamguard.training.night`): what a twin is, and that it is the
same in every fold and draw (how twins join training: tests/test_twins.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from images import encode, noise
from streamguard.training.night import MAX_SIDE, NightMode


def scene(size: tuple[int, int]) -> Image.Image:
    """A photo-like scene: smooth gradients and a few shapes, so a twin's content can be compared."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    red = 255 * xx / w
    green = 255 * yy / h
    blue = 128 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    pixels = np.stack([red, green, blue], axis=-1)
    pixels[h // 4: h // 2, w // 4: w // 2] = (250, 250, 240)  # a bright window
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def luminance(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("L").resize(size), np.float32).ravel()


def test_a_twin_is_a_noisy_processed_jpeg_of_the_same_scene_reproducible_from_the_photo() -> None:
    photo = encode(scene((1600, 1000)), "JPEG", quality=92)
    night = NightMode()
    twin = night(photo)
    assert twin == night(photo)  # the same in every fold and draw
    assert twin != night(encode(scene((1600, 1000)), "JPEG", quality=91))
    image = Image.open(io.BytesIO(twin))
    assert image.format == "JPEG"
    assert min(image.size) <= MAX_SIDE and abs(image.width / image.height - 1.6) < 0.01
    original = Image.open(io.BytesIO(photo))
    a, b = luminance(original, (160, 100)), luminance(image, (160, 100))
    assert np.corrcoef(a, b)[0, 1] > 0.8  # the same scene...
    assert np.abs(a - b).mean() > 5  # ...under other light and processing
    # ...with its flat areas no longer flat: shot and read noise survive the denoise.
    flat = np.asarray(image.convert("L"), np.float32)[image.height // 4 + 20: image.height // 2 - 20,
                                                     image.width // 4 + 20: image.width // 2 - 20]
    source_flat = np.asarray(original.convert("L"), np.float32)[250 + 20: 500 - 20, 400 + 20: 800 - 20]
    assert flat.std() > source_flat.std() + 0.5


def test_a_small_photo_keeps_its_size() -> None:
    image = Image.open(io.BytesIO(NightMode()(encode(noise((120, 90)), "PNG"))))
    assert image.size == (120, 90)
