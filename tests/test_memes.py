"""Memes: a caption over the picture or in a band above it, the picture otherwise kept, reproducibly."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from streamguard.training.memes import Meme, fitted_lines

GREY = 128


def png(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    # Mid-grey with a little noise: white captions, black outlines and a white band all stand out from it.
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(GREY, 4, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def grey_levels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float64)


def test_a_meme_is_a_reproducible_jpeg_of_the_picture_with_a_caption() -> None:
    layouts = set()
    for seed in range(12):
        data = png(seed)
        out = Meme()(data)
        assert out == Meme()(data), "seeded by the picture's bytes: every fold meets the same meme"
        image = Image.open(io.BytesIO(out))
        assert image.format == "JPEG" and image.mode == "RGB" and image.width == 320
        levels = grey_levels(out)
        off = np.abs(levels - GREY) > 60  # caption strokes, outlines, a band; the picture stays near grey
        band = image.height - 240
        if band == 0:
            layouts.add("classic")
            rows = off.mean(axis=1)
            # Drawn across the top or the bottom fifth (or both); the middle of the picture is left alone.
            assert max(rows[:48].max(), rows[-48:].max()) > 0.05
            assert rows[96:144].max() < 0.01
        else:
            layouts.add("band")
            assert 10 < band < 120
            above, below = levels[:band], levels[band:]
            assert np.median(above) > 240 and (above < 100).mean() > 0.005  # black text on a white band
            assert np.abs(below - GREY).mean() < 3, "the picture sits below the band, as it was"
    assert layouts == {"classic", "band"}


def test_a_long_caption_shrinks_to_two_lines_that_fit() -> None:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = "WHEN THE MODERATION QUEUE IS LONGER THAN THE WEEKEND"
    font, lines = fitted_lines(draw, text, width=200, size=60, stroke=4)
    assert len(lines) <= 2 and " ".join(lines) == text
    assert all(draw.textlength(line, font=font) + 8 <= 200 for line in lines)
    assert font.size < 60  # shrunk: at 60 px it took more than two lines
    # A picture too narrow for any size keeps the smallest font rather than looping.
    tiny, _ = fitted_lines(draw, text, width=10, size=60, stroke=1)
    assert tiny.size == 8
    assert Image.open(io.BytesIO(Meme()(png(3, size=(60, 400))))).width == 60  # never widened for the text
