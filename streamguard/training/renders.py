"""Rendered screens for the real class: procedural app and desktop screenshots, drawn here, never downloaded.

Platforms see screenshots at least as often as camera photos, and a CLIP probe trained on photos against
generations reads flat colour, crisp glyphs and vector shapes as "not a camera", hence generated: under
leave-one-source-out the held-out app screenshots scored a median of 0.76 and their top image alone set
`ai_threshold` under the 2% rule (docs/validation.md step 24). These renders give the real class what a
screen looks like (status and navigation bars, lists, cards, buttons, anti-aliased text and icons) without
any held-out image: they are drawn from a seed, so every LOSO fold trains on the same ones and none is held
out. Rasterised at twice the size and box-reduced, as a compositor's anti-aliasing leaves edges; saved
losslessly, as a screenshot is, then augmented like every training image.

`FeedPost` draws the same chrome around a real training photo, as a feed shows a post: the renders hold no
photo, and the commonest screenshot on a platform is of a post (docs/validation.md step 28, shipped).
"""

from __future__ import annotations

import hashlib
import io
import random
import string
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from streamguard.evaluation.datasets import REAL, Sample

SOURCE = "rendered-screens"
# In the embedding cache key and the LOSO folds' settings: a changed drawing must never read these rows.
RENDER_VERSION = 1
# (width, height) of common phones, tablets and desktops; phones twice as likely, as on a social platform.
SCREENS = ((1080, 1920), (1080, 2340), (720, 1280), (1170, 2532), (1080, 1920), (1080, 2400),
           (1600, 2560), (2048, 1536), (1920, 1080), (1366, 768), (2560, 1440), (1280, 800))
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Theme:
    background: tuple[int, int, int]
    surface: tuple[int, int, int]
    text: tuple[int, int, int]
    muted: tuple[int, int, int]
    accent: tuple[int, int, int]


def theme(rng: random.Random) -> Theme:
    accent = tuple(rng.randint(20, 235) for _ in range(3))
    if rng.random() < 0.4:  # dark mode
        base = rng.randint(0, 40)
        return Theme((base,) * 3, (base + rng.randint(10, 30),) * 3, (235, 235, 235), (150, 150, 150), accent)
    base = rng.randint(235, 255)
    return Theme((base,) * 3, (255, 255, 255), (rng.randint(10, 40),) * 3, (110, 110, 115), accent)  # type: ignore[arg-type]


def words(rng: random.Random, n: int) -> str:
    made = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(n)]
    made[0] = made[0].capitalize()
    return " ".join(made)


class Canvas:
    """A screen drawn at SUPERSAMPLE x its size, in its own units (screen pixels)."""

    def __init__(self, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
        self.size = size
        self.image = Image.new("RGB", (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE), colour)
        self.draw = ImageDraw.Draw(self.image)
        self._fonts: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}

    def box(self, x0: float, y0: float, x1: float, y1: float, fill: tuple[int, int, int], radius: float = 0) -> None:
        s = SUPERSAMPLE
        self.draw.rounded_rectangle((x0 * s, y0 * s, x1 * s, y1 * s), radius=radius * s, fill=fill)

    def circle(self, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
        s = SUPERSAMPLE
        self.draw.ellipse(((cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s), fill=fill)

    def triangle(self, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
        s = SUPERSAMPLE
        self.draw.polygon([((cx - r) * s, (cy - r) * s), ((cx + r) * s, cy * s), ((cx - r) * s, (cy + r) * s)], fill=fill)

    def text(self, x: float, y: float, body: str, size: float, fill: tuple[int, int, int]) -> None:
        px = max(6, round(size * SUPERSAMPLE))
        if px not in self._fonts:
            self._fonts[px] = ImageFont.load_default(size=px)
        self.draw.text((x * SUPERSAMPLE, y * SUPERSAMPLE), body, font=self._fonts[px], fill=fill)

    def screen(self) -> Image.Image:
        """The screen at its own size, anti-aliased as a compositor leaves it."""
        return self.image.reduce(SUPERSAMPLE)

    def png(self) -> bytes:
        out = io.BytesIO()
        self.screen().save(out, format="PNG")
        return out.getvalue()


def icon(canvas: Canvas, rng: random.Random, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    shape = rng.random()
    if shape < 0.4:
        canvas.circle(cx, cy, r, colour)
    elif shape < 0.8:
        canvas.box(cx - r, cy - r, cx + r, cy + r, colour, radius=r * rng.uniform(0.1, 0.5))
    else:
        canvas.triangle(cx, cy, r, colour)


def status_bar(canvas: Canvas, rng: random.Random, look: Theme, unit: float) -> float:
    """A phone's status bar (the time and a few system icons); where the screen's content starts."""
    width, height = canvas.size
    if height <= width:
        return 0.0
    bar = unit * 1.6
    canvas.text(unit, unit * 0.3, f"{rng.randint(0, 23)}:{rng.randint(0, 59):02d}", unit * 0.9, look.text)
    for k in range(3):
        icon(canvas, rng, width - unit * (1.2 + 1.4 * k), bar / 2, unit * 0.45, look.text)
    return bar


def nav_bar(canvas: Canvas, rng: random.Random, look: Theme, unit: float, bottom: float) -> None:
    """A phone's navigation bar, from ``bottom`` down."""
    width, height = canvas.size
    if height > width:
        canvas.box(0, bottom, width, height, look.surface)
        for k in range(3):
            icon(canvas, rng, width * (k + 1) / 4, (bottom + height) / 2, unit * 0.7, look.muted)


def render_screen(seed: int) -> bytes:
    """One screenshot as PNG bytes, the same for the same seed."""
    rng = random.Random(f"render:{RENDER_VERSION}:{seed}")
    width, height = rng.choice(SCREENS)
    look = theme(rng)
    canvas = Canvas((width, height), look.background)
    unit = min(width, height) / 36  # a density-independent pixel, roughly
    y = status_bar(canvas, rng, look, unit)
    header = unit * rng.uniform(2.8, 4.5)
    canvas.box(0, y, width, y + header, look.accent if rng.random() < 0.5 else look.surface)
    canvas.text(unit * 1.2, y + header * 0.3, words(rng, rng.randint(1, 3)), unit * 1.1, look.text)
    y += header + unit * 0.8
    bottom = height - (unit * 3 if height > width else 0)
    while y < bottom - unit * 3:
        kind = rng.random()
        if kind < 0.5:  # a list row: an icon, a title, a line of detail, a separator
            row = unit * rng.uniform(3.0, 4.2)
            icon(canvas, rng, unit * 2.2, y + row / 2, unit * 1.0, look.accent)
            canvas.text(unit * 4.2, y + row * 0.18, words(rng, rng.randint(1, 4)), unit * 0.85, look.text)
            canvas.text(unit * 4.2, y + row * 0.55, words(rng, rng.randint(3, 8)), unit * 0.65, look.muted)
            canvas.box(unit * 4.2, y + row - 1, width, y + row, look.surface)
            y += row
        elif kind < 0.8:  # a card with a flat header band and a few lines
            card = unit * rng.uniform(6, 12)
            canvas.box(unit, y, width - unit, y + card, look.surface, radius=unit * 0.6)
            canvas.box(unit, y, width - unit, y + card * 0.35, look.accent, radius=unit * 0.6)
            for k in range(rng.randint(1, 3)):
                canvas.text(unit * 2, y + card * (0.42 + 0.18 * k), words(rng, rng.randint(2, 7)), unit * 0.75, look.text)
            y += card + unit * 0.8
        else:  # a row of buttons
            label_size = unit * 0.8
            x = unit
            for _ in range(rng.randint(1, 3)):
                label = words(rng, 1).upper()
                w = max(unit * 5, len(label) * label_size * 0.7 + unit * 2)
                if x + w > width - unit:
                    break
                canvas.box(x, y, x + w, y + unit * 2.4, look.accent, radius=unit * rng.choice((0.3, 1.2)))
                canvas.text(x + unit, y + unit * 0.6, label, label_size, look.background)
                x += w + unit
            y += unit * 3.2
    nav_bar(canvas, rng, look, unit, bottom)
    return canvas.png()


def rendered_samples(count: int, seed: int, cache_dir: Path) -> list[Sample]:
    """``count`` renders written once under ``cache_dir`` (their bytes depend only on the seed), as real
    training samples of their own source."""
    root = cache_dir / f"renders-v{RENDER_VERSION}-seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for k in range(count):
        path = root / f"{k:05d}.png"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(render_screen(seed * 1_000_003 + k))
            tmp.replace(path)
        samples.append(Sample(id=f"{SOURCE}/v{RENDER_VERSION}/{seed}/{k:05d}", path=str(path), member=None,
                              label=REAL, generator="real", family="real", source=SOURCE, split="train"))
    return samples


FEED_VERSION = 1
# An app shows a post between these aspect ratios (width / height) and crops the photo to fit.
FEED_ASPECTS = (0.8, 1.91)
# Apps and browsers resample with different filters; a screenshot keeps whichever drew the photo.
RESAMPLERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)


class FeedPost:
    """Image bytes -> a screenshot of a social feed that shows the image as a post (`Twins`).

    The commonest screenshot on a platform is of a post: a photo resampled into the app's frame, with the
    app's chrome around it. The image keeps its label and group (it leaves training with them: a real photo's
    post is real, a generated image's is generated, so the chrome tells neither), the chrome is drawn as
    `render_screen` draws it; a quarter are re-shared as JPEG, as a screenshot forwarded is. Seeded by the
    photo's bytes, so every fold and augmentation draw sees the same screenshot."""

    version = f"feed-post-{FEED_VERSION}"
    suffix = "#feed"

    def __call__(self, data: bytes) -> bytes:
        rng = random.Random(f"feed:{FEED_VERSION}:{hashlib.sha256(data).hexdigest()}")
        width, height = rng.choice(SCREENS)
        look = theme(rng)
        canvas = Canvas((width, height), look.background)
        unit = min(width, height) / 36
        y = status_bar(canvas, rng, look, unit)
        header = unit * rng.uniform(2.8, 4.0)
        canvas.box(0, y, width, y + header, look.surface)
        canvas.text(unit * 1.2, y + header * 0.3, words(rng, 1), unit * 1.1, look.text)
        y += header
        # A phone gives the post its whole width; a tablet or desktop a centred column beside a sidebar.
        column = width if height > width else round(min(width * rng.uniform(0.4, 0.55), unit * 30))
        x0 = (width - column) // 2
        if x0:
            for k in range(rng.randint(3, 7)):
                row = y + unit * (1.5 + 2.4 * k)
                icon(canvas, rng, unit * 2, row, unit * 0.6, look.muted)
                canvas.text(unit * 3.4, row - unit * 0.45, words(rng, 1), unit * 0.8, look.text)
        avatar = unit * 1.2
        canvas.circle(x0 + unit * 2, y + unit * 2, avatar, look.accent)
        canvas.text(x0 + unit * 3.8, y + unit * 1.1, words(rng, rng.randint(1, 2)), unit * 0.8, look.text)
        canvas.text(x0 + unit * 3.8, y + unit * 2.1, "@" + words(rng, 1).lower(), unit * 0.6, look.muted)
        y += unit * 4.2
        photo = Image.open(io.BytesIO(data))
        aspect = min(max(photo.width / photo.height, FEED_ASPECTS[0]), FEED_ASPECTS[1])
        frame = (column, round(column / aspect))
        photo.draft("RGB", frame)  # a JPEG decodes at a fraction of its size when that suffices
        photo = ImageOps.fit(photo.convert("RGB"), frame, method=rng.choice(RESAMPLERS))
        top = round(y)
        y += frame[1] + unit * 0.8
        bottom = height - (unit * 3 if height > width else 0)
        for k in range(3):  # like, comment, share; and a caption below
            icon(canvas, rng, x0 + unit * (1.8 + 2.4 * k), y + unit, unit * 0.7, look.text)
        canvas.text(x0 + unit, y + unit * 2.3, f"{rng.randint(2, 99_999):,} likes", unit * 0.7, look.text)
        for k in range(rng.randint(1, 3)):
            canvas.text(x0 + unit, y + unit * (3.4 + 1.1 * k), words(rng, rng.randint(3, 9)), unit * 0.7, look.text)
        nav_bar(canvas, rng, look, unit, bottom)
        screen = canvas.screen()
        # Under the bars, as a feed scrolls: what of the photo the screen shows.
        visible = max(0, min(frame[1], round(bottom) - top))
        screen.paste(photo.crop((0, 0, frame[0], visible)), (x0, top))
        out = io.BytesIO()
        if rng.random() < 0.25:
            screen.save(out, format="JPEG", quality=rng.randint(70, 92))
        else:
            screen.save(out, format="PNG")
        return out.getvalue()
