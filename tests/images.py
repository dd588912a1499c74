"""Images the tests make themselves (tests never read ../shared/data)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def solid(value: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, (value,) * len(mode) if mode not in ("L", "1", "P") else value)


def noise(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def drawn_face(size: tuple[int, int] = (480, 360), at: tuple[int, int] = (240, 170), r: int = 60) -> Image.Image:
    """A painted face (oval, eyes under brows, nose, mouth; softened) of half-width ``r`` centred ``at``, on
    a flat background: enough of a face for OpenCV's frontal-face cascade, drawn rather than photographed."""
    image = Image.new("RGB", size, (70, 90, 120))
    draw = ImageDraw.Draw(image)
    x, y = at
    draw.ellipse((x - r, y - 1.3 * r, x + r, y + 1.3 * r), fill=(225, 180, 150))
    for side in (-1, 1):
        ex, ey = x + side * 0.4 * r, y - 0.25 * r
        draw.ellipse((ex - 0.22 * r, ey - 0.1 * r, ex + 0.22 * r, ey + 0.1 * r), fill=(40, 30, 30))
        draw.rectangle((ex - 0.28 * r, ey - 0.35 * r, ex + 0.28 * r, ey - 0.25 * r), fill=(60, 40, 30))
    draw.polygon([(x, y - 0.1 * r), (x - 0.12 * r, y + 0.35 * r), (x + 0.12 * r, y + 0.35 * r)], fill=(200, 150, 125))
    draw.ellipse((x - 0.35 * r, y + 0.6 * r, x + 0.35 * r, y + 0.8 * r), fill=(150, 60, 60))
    return image.filter(ImageFilter.GaussianBlur(3))


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def animated_gif(frames: int = 3, size: tuple[int, int] = (32, 32)) -> bytes:
    images = [solid(40 + 80 * i, size) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    return buf.getvalue()


def truncated_jpeg(size: tuple[int, int] = (256, 256)) -> bytes:
    data = encode(noise(size), "JPEG", quality=90)
    return data[: len(data) // 2]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(side: int = 100_000) -> bytes:
    """A valid PNG header declaring side x side pixels with a few hundred bytes of data: decoding it fully
    would need tens of GB."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_strip(width: int = 1, height: int = 100_000) -> bytes:
    """A valid, fully decodable grayscale PNG of a few hundred bytes: within the pixel limit, yet for
    1x100000 resizing its short side to 224 would need ~15 GB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((width + 1) * height), 9)  # each row: filter byte + zero pixels
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def mpo(first: Image.Image, second: Image.Image, **kwargs: object) -> bytes:
    """A two-picture JPEG (format MPO), as phone cameras write them; ``kwargs`` go to the first frame."""
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second], **kwargs)
    return buf.getvalue()


def tiny_root(directory: Path) -> Path:
    """A labelled root as `eval` reads it: two real sources and two generators, three train and two val noise
    images each (a real row's generator column is its source)."""
    rows = ["path,label,generator,split"]
    for label, kind in ((0, "real"), (1, "ai")):
        for k in range(2):
            group = f"{kind}{k}"
            (directory / group).mkdir(parents=True)
            for i, split in enumerate(("train",) * 3 + ("val",) * 2):
                noise((96, 80), seed=100 * label + 10 * k + i).save(directory / group / f"{i}.png")
                rows.append(f"{group}/{i}.png,{kind},{group},{split}")
    (directory / "manifest.csv").write_text("\n".join(rows) + "\n")
    return directory
