"""Decode untrusted image bytes into an RGB image, or fail with a typed error.

Limits are checked before pixels are decoded: byte size first, then the pixel count from the header, so
a decompression bomb costs a header parse and nothing more.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from streamguard.config import IntakeSettings
from streamguard.errors import CorruptImage, EmptyImage, TooLarge, UnsupportedFormat

try:  # HEIF is optional: present when pillow-heif installs cleanly on the platform.
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - depends on the platform's wheels
    pass

# Composite transparent images on white: that is how feeds show them to people.
_MATTE = (255, 255, 255)
_EXIF_TAGS = ("Make", "Model", "Software", "DateTime", "Artist", "ImageDescription", "Copyright")
_EXIF_SUBIFD_TAGS = ("DateTimeOriginal", "LensModel", "UserComment")
_MAX_TEXT = 16_384


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for detectors. ``rgb`` may be smaller than the original when a JPEG was decoded at
    reduced size; ``width``/``height`` are always the original's (after EXIF orientation)."""

    rgb: Image.Image
    format: str
    width: int
    height: int
    frames: int = 1
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def reduced(self) -> bool:
        return self.rgb.size != (self.width, self.height)


def decode_image(data: bytes, limits: IntakeSettings, min_side: int | None = None) -> DecodedImage:
    """Decode ``data``. With ``min_side``, a JPEG may be decoded at a power-of-two reduction (Pillow's draft
    mode) as long as both sides stay at least ``min_side``; None means native pixels are needed."""
    if not data:
        raise EmptyImage("zero-byte payload")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"{len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    img = _open(data)
    fmt = img.format or "unknown"
    if fmt not in limits.formats:
        raise UnsupportedFormat(f"format {fmt} is not accepted (accepted: {', '.join(limits.formats)})")
    width, height = img.size
    if width * height > limits.max_pixels:
        raise TooLarge(f"{width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}")
    frames = getattr(img, "n_frames", 1)
    if min_side is not None and fmt == "JPEG":
        img.draft("RGB", (min_side, min_side))
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on hostile input
        raise CorruptImage(f"cannot decode {fmt}: {exc}") from None
    metadata = _metadata(img)
    img, (width, height) = _orient(img, (width, height))
    return DecodedImage(
        rgb=_to_rgb(img),
        format=fmt,
        width=width,
        height=height,
        frames=frames,
        metadata=MappingProxyType(metadata),
    )


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedFormat(f"not a recognised image (starts with {data[:8]!r})") from None
    except Image.DecompressionBombError as exc:
        raise TooLarge(str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise CorruptImage(f"cannot parse image header: {exc}") from None


def _orient(img: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the image
        return img, size
    if oriented.size != img.size:  # rotated by 90 or 270 degrees
        size = (size[1], size[0])
    return oriented, size


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        matte = Image.new("RGBA", rgba.size, (*_MATTE, 255))
        return Image.alpha_composite(matte, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's convert() clips 16-bit values at 255 instead of scaling, which turns most photos white.
    arr = np.asarray(img)
    if img.mode == "F":
        peak = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
        scaled = np.nan_to_num(arr) / peak * 255.0
    else:
        scaled = arr.astype(np.float64) / 257.0
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _metadata(img: Image.Image) -> dict[str, str]:
    """Text metadata that provenance detectors read: PNG/WebP text chunks, XMP, a few EXIF tags."""
    out: dict[str, str] = {}
    for key, value in img.info.items():
        if isinstance(value, str):
            out[f"info.{key}"] = value[:_MAX_TEXT]
        elif key in ("xmp", "XML:com.adobe.xmp") and isinstance(value, bytes):
            out["xmp"] = value[:_MAX_TEXT].decode("utf-8", "replace")
    try:
        exif = img.getexif()
        names = {tag: ExifTags.TAGS.get(tag) for tag in exif}
        for tag, name in names.items():
            if name in _EXIF_TAGS:
                out[f"exif.{name}"] = str(exif[tag])[:512]
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        for tag, value in sub.items():
            name = ExifTags.TAGS.get(tag)
            if name in _EXIF_SUBIFD_TAGS:
                out[f"exif.{name}"] = str(value)[:512]
    except Exception:  # noqa: BLE001 - metadata is evidence, never a reason to reject the image
        pass
    return out
