"""An image made into a meme: a caption drawn over it or in a band above it, re-saved as JPEG.

Memes are much of what a social platform ingests, and neither class of the training data holds one: a
probe may read heavy captions over a photo as "not a camera" (flagging real photos) or, having been given
screenshots and feed posts with text as real, as "real" (clearing generations). `Meme` draws the two common
layouts: classic (white capitals with a black outline across the top, the bottom or both) and a band
(black text on a white band above the picture, as newer meme apps make them). The LOSO folds score every
held-out image as a meme with it (`perturb`'s ``meme``, docs/validation.md step 52), and a probe can learn
from training images of both classes made into memes (`twins`' ``meme`` and ``meme_fake``, step 53). Both
classes get the same drawing, seeded by the image's bytes, so every fold meets the same meme.
"""

from __future__ import annotations

import hashlib
import io
import random

from PIL import Image, ImageDraw, ImageFont

from streamguard.training.renders import words

# In every cached score of a meme (`perturb`) and the twins' cache keys: a changed drawing never reads an old one.
MEME_VERSION = 1
# Meme makers save JPEG in this range; the caption's edges then carry the ringing a real meme's do.
JPEG_QUALITY = (70, 92)
_WIDTH_USED = 0.94  # of the picture's width, a caption line at most


class Meme:
    """Image bytes -> JPEG bytes of the image as a meme (module docstring)."""

    version = f"meme-{MEME_VERSION}"
    suffix = "#meme"

    def __call__(self, data: bytes) -> bytes:
        rng = random.Random(f"meme:{MEME_VERSION}:{hashlib.sha256(data).hexdigest()}")
        picture = Image.open(io.BytesIO(data)).convert("RGB")
        if rng.random() < 0.7:
            meme = classic(picture, rng)
        else:
            meme = banded(picture, rng)
        out = io.BytesIO()
        meme.save(out, format="JPEG", quality=rng.randint(*JPEG_QUALITY))
        return out.getvalue()


def caption(rng: random.Random) -> str:
    return words(rng, rng.randint(2, 7))


def fitted_lines(draw: ImageDraw.ImageDraw, text: str, width: float, size: int,
                 stroke: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, list[str]]:
    """The font at ``size`` or smaller and ``text`` broken into at most two lines that each fit ``width``."""
    while True:
        font = ImageFont.load_default(size=size)
        lines: list[str] = []
        for word in text.split():
            trial = f"{lines[-1]} {word}" if lines else word
            if lines and draw.textlength(trial, font=font) + 2 * stroke <= width:
                lines[-1] = trial
            else:
                lines.append(word)
        fits = all(draw.textlength(line, font=font) + 2 * stroke <= width for line in lines)
        if (fits and len(lines) <= 2) or size <= 8:
            return font, lines
        size = max(8, int(size * 0.85))


def line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> float:
    return font.size * 1.15 if isinstance(font, ImageFont.FreeTypeFont) else 12  # the bitmap fallback's 11 px


def draw_block(draw: ImageDraw.ImageDraw, fitted: tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, list[str]],
               width: int, top: float, fill: tuple[int, int, int], stroke: int,
               stroke_fill: tuple[int, int, int] | None, from_bottom: bool = False) -> None:
    """``fitted``'s lines (`fitted_lines`) centred from ``top`` down (or ending at ``top`` when ``from_bottom``)."""
    font, lines = fitted
    step = line_height(font)
    height = step * len(lines)
    y = top - height if from_bottom else top
    for line in lines:
        x = (width - draw.textlength(line, font=font)) / 2
        draw.text((x, y), line, font=font, fill=fill, stroke_width=stroke, stroke_fill=stroke_fill)
        y += step


def classic(picture: Image.Image, rng: random.Random) -> Image.Image:
    """White capitals with a black outline over the picture's top, bottom or both."""
    meme = picture.copy()
    draw = ImageDraw.Draw(meme)
    width, height = meme.size
    size = max(10, round(min(height / 8, width / 9)))
    stroke = max(1, size // 12)
    margin = height * 0.02
    where = rng.choice(("top", "bottom", "both"))
    if where in ("top", "both"):
        top = fitted_lines(draw, caption(rng).upper(), width * _WIDTH_USED, size, stroke)
        draw_block(draw, top, width, margin, (255, 255, 255), stroke, (0, 0, 0))
    if where in ("bottom", "both"):
        bottom = fitted_lines(draw, caption(rng).upper(), width * _WIDTH_USED, size, stroke)
        draw_block(draw, bottom, width, height - margin, (255, 255, 255), stroke, (0, 0, 0), from_bottom=True)
    return meme


def banded(picture: Image.Image, rng: random.Random) -> Image.Image:
    """Black sentence-case text on a white band above the picture."""
    width, height = picture.size
    size = max(10, round(width / 16))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font, lines = fitted = fitted_lines(probe, caption(rng), width * _WIDTH_USED, size, 0)
    band = round(line_height(font) * len(lines) + size)
    meme = Image.new("RGB", (width, height + band), (255, 255, 255))
    meme.paste(picture, (0, band))
    draw_block(ImageDraw.Draw(meme), fitted, width, size / 2, (0, 0, 0), 0, None)
    return meme
