"""Decode untrusted image bytes into an RGB image, or fail with a typed error.

Limits are checked before pixels are decoded: byte size first, then the pixel count and the aspect ratio
from the header, so a decompression bomb or a 1x100000 strip costs a header parse and nothing more.

When the caller needs no more than ``min_side`` pixels on each side, the image is held small: a JPEG is
decoded at a reduced DCT scale (Pillow's draft mode), and any image still far larger than needed is
reduced by an integer factor right after decoding, so a batch never holds full-size pixels it would
only shrink later. `estimate_decoded_pixels` predicts that held size from the header alone.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import structlog
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from streamguard.config import IntakeSettings
from streamguard.errors import (
    CorruptImage,
    EmptyImage,
    TooLarge,
    UnsupportedFormat,
    UnsupportedGeometry,
)

try:  # HEIF is optional: present when pillow-heif installs cleanly on the platform.
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - depends on the platform's wheels
    pass

log = structlog.get_logger(__name__)

# Composite transparent images on white: that is how feeds show them to people.
_MATTE = (255, 255, 255)
_EXIF_TAGS = ("Make", "Model", "Software", "DateTime", "Artist", "ImageDescription", "Copyright")
_EXIF_SUBIFD_TAGS = ("DateTimeOriginal", "LensModel", "UserComment")
_MAX_TEXT = 16_384
# A multi-picture JPEG (phone cameras: depth maps, previews) is a JPEG whose primary image is judged.
_FORMAT_ALIASES = {"MPO": "JPEG"}
# After decoding, reduce only while the contract's own resize still shrinks the result at least this many
# times: Pillow's measure (``reducing_gap``) for a two-step resize that matches one fair resample.
_REDUCING_GAP = 3.0
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                          Image.Transpose.ROTATE_270})


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for detectors. ``rgb`` may be smaller than the original when it was decoded or held
    at reduced size; ``width``/``height`` are always the original's (after EXIF orientation)."""

    rgb: Image.Image
    format: str
    width: int
    height: int
    frames: int = 1
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # The bytes as received (the caller's object, not a copy): content credentials sign a hash of the exact
    # file, so a detector that verifies them needs the bytes, not the pixels. Kept out of repr and equality.
    data: bytes = field(default=b"", repr=False, compare=False)

    @property
    def reduced(self) -> bool:
        return self.rgb.size != (self.width, self.height)


@dataclass(frozen=True)
class ImageHeader:
    """An image opened but not decoded, its header checked against the limits, and what decoding it will
    hold (`decoded_pixels`). A batch bounds what it decodes at once by reading them; handing each to
    `decode_image` then saves parsing every header twice. Decoded once, by one thread."""

    image: ImageFile.ImageFile
    format: str
    size: tuple[int, int]  # the header's, before any reduced-size decoding
    frames: int
    decoded_pixels: int


def read_header(data: bytes, limits: IntakeSettings, min_side: int | None = None) -> ImageHeader:
    """``data`` opened for `decode_image` at ``min_side``. Raises an `IntakeError` for bytes it will refuse;
    hostile headers may raise anything else."""
    img = _open_checked(data, limits)
    fmt = _format(img)
    size = img.size
    frames = getattr(img, "n_frames", 1)
    _draft(img, min_side)
    width, height = _reduced_size(img.size, _reduce_factor(img.size, min_side))
    return ImageHeader(img, fmt, size, frames, width * height)


def decode_image(data: bytes, limits: IntakeSettings, min_side: int | None = None,
                 header: ImageHeader | None = None) -> DecodedImage:
    """Decode ``data``. With ``min_side``, the image may be held at reduced size: a JPEG decoded at a
    power-of-two reduction (Pillow's draft mode) keeping both sides at least ``min_side``, any image
    reduced by an integer factor while both sides stay at least ``_REDUCING_GAP * min_side``. None means
    native pixels are needed. ``header``: `read_header` of the same bytes at the same ``min_side``, not yet
    decoded."""
    if header is None:
        header = read_header(data, limits, min_side)
    img, fmt, (width, height), frames = header.image, header.format, header.size, header.frames
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on hostile input
        raise CorruptImage(f"cannot decode {fmt}: {exc}") from None
    metadata = _metadata(img)
    img, transpose = _upright(img, min_side)
    if transpose in _SWAPS_SIDES:
        width, height = height, width
    return DecodedImage(
        rgb=img,
        format=fmt,
        width=width,
        height=height,
        frames=frames,
        metadata=MappingProxyType(metadata),
        data=data,
    )


def decode_box(image: DecodedImage, box: tuple[int, int, int, int], min_side: int) -> Image.Image:
    """The region ``box`` of ``image`` (in ``image.rgb``'s pixels) with its shorter side at least ``min_side``
    pixels where the original holds that many: decoded again from ``image.data`` at the scale that gives the
    region that size when ``image`` was held too small for it, else cut from ``image.rgb``.

    A decode is reduced for the whole image's sake; a part of it judged on its own (the photo inside a
    screenshot) would otherwise be enlarged from pixels the decode threw away: a phone screenshot held at a
    quarter scale shows a landscape post's photo at ~140 px where the file holds ~560. The bytes passed every
    limit when ``image`` was decoded from them, so only the region's scale is decided here. While it runs it
    holds the whole image at that scale (a phone screenshot's landscape photo: 540x1170), one image per
    preparing thread, beside what a batch's pixel budget (`estimate_decoded_pixels`) counts."""
    left, top, right, bottom = box
    held = min(right - left, bottom - top)
    if not image.reduced or not image.data or held >= min_side:
        return image.rgb.crop(box)
    # Sides scale together, so the region has ``min_side`` where the whole image's short side has this: the
    # decode `decode_image` makes at that side serves it.
    side = math.ceil(min_side * min(image.rgb.size) / held)
    try:
        img = _open(image.data)
        _draft(img, side)
        img.load()
    except Exception as exc:  # noqa: BLE001 - hostile bytes may decode at one scale and fail at another
        # The detectors run a batch at a time: an error here would cost every image in it, so this one keeps
        # the view its first decode gives.
        log.warning("intake.decode_again_failed", error=str(exc), held=held, wanted=min_side)
        return image.rgb.crop(box)
    img, _ = _upright(img, side)
    sx, sy = img.width / image.rgb.width, img.height / image.rgb.height
    region = (round(left * sx), round(top * sy), min(img.width, round(right * sx)), min(img.height, round(bottom * sy)))
    return img.crop(region)


def estimate_decoded_pixels(data: bytes, settings: IntakeSettings, decode_side: int | None) -> int:
    """Pixels of the image `decode_image(data, settings, decode_side)` returns, from the header alone (no
    pixel is decoded); 0 for bytes the decode step will refuse. A batch can use it to bound what it holds
    at once; the one image being decoded briefly needs its full (drafted) size on top."""
    try:
        header = read_header(data, settings, decode_side)
    except Exception:  # noqa: BLE001 - refused or hostile headers: the decode step reports what is wrong
        return 0
    header.image.close()
    return header.decoded_pixels


def _open_checked(data: bytes, limits: IntakeSettings) -> ImageFile.ImageFile:
    """The opened (not decoded) image, once every limit that the header can answer is met."""
    if not data:
        raise EmptyImage("zero-byte payload")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"{len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    img = _open(data)
    fmt = _format(img)
    if fmt not in limits.formats:
        raise UnsupportedFormat(f"format {img.format or fmt} is not accepted (accepted: {', '.join(limits.formats)})")
    width, height = img.size
    if width * height > limits.max_pixels:
        raise TooLarge(f"{width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise UnsupportedGeometry(
            f"{width}x{height} has an aspect ratio of {_ratio(width, height)}:1, over the limit of "
            f"{limits.max_aspect_ratio:g}:1"
        )
    return img


def _ratio(width: int, height: int) -> str:
    short = min(width, height)
    return f"{max(width, height) / short:.1f}" if short else "inf"


def _format(img: Image.Image) -> str:
    fmt = img.format or "unknown"
    return _FORMAT_ALIASES.get(fmt, fmt)


def _open(data: bytes) -> ImageFile.ImageFile:
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


def _draft(img: ImageFile.ImageFile, min_side: int | None) -> None:
    """A JPEG set to decode at the largest power-of-two reduction keeping both sides at least ``min_side``
    (Pillow's draft mode; only the header's scale and size are rewritten). Other formats decode whole."""
    if min_side is not None and _format(img) == "JPEG":
        img.draft("RGB", (min_side, min_side))


def _upright(img: Image.Image, min_side: int | None) -> tuple[Image.Image, Image.Transpose | None]:
    """The loaded ``img`` as RGB, reduced for ``min_side`` (`_reduce`) and turned as its EXIF orientation asks;
    and that turn."""
    transpose = _orientation(img)
    # Rebinding ``img`` at each step lets the full-size buffer go as soon as the next one exists.
    img = _to_rgb(img)
    img = _reduce(img, min_side)
    if transpose is not None:
        img = img.transpose(transpose)
    return img, transpose


def _reduce_factor(size: tuple[int, int], min_side: int | None) -> int:
    """The integer reduction that keeps both sides at least ``_REDUCING_GAP * min_side``; 1 for none."""
    if min_side is None:
        return 1
    return max(1, math.floor(min(size) / (_REDUCING_GAP * min_side)))


def _reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    # Image.reduce keeps the partial boxes at the right and bottom edges.
    return (-(-size[0] // factor), -(-size[1] // factor))


def _reduce(img: Image.Image, min_side: int | None) -> Image.Image:
    factor = _reduce_factor(img.size, min_side)
    return img.reduce(factor) if factor > 1 else img


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The transpose that EXIF orientation asks for, read before the image is converted or reduced (both
    lose the EXIF block of some formats, TIFF's among them)."""
    try:
        return _TRANSPOSE.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the image
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        # Pasting through its own alpha gives alpha_composite's pixels with one full-size copy, not four.
        rgb = Image.new("RGB", rgba.size, _MATTE)
        rgb.paste(rgba, mask=rgba)
        return rgb
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's convert() clips 16-bit values at 255 instead of scaling, which turns most photos white.
    arr = np.asarray(img)
    if img.mode == "F":
        peak = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
        scaled = np.nan_to_num(arr) / peak * 255.0
    else:
        scaled = arr.astype(np.float32) / 257.0  # float32 rounds 16-bit values exactly as float64 would
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
