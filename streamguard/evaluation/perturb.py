"""Robustness perturbations and the format/resolution normalization, bytes in, bytes out.

Each one decodes with the intake decoder (EXIF orientation, alpha on white, the same limits), changes the
pixels, and re-encodes, so the perturbed image then goes through the real intake path like any upload.
Real and fake images get exactly the same treatment.

Re-encoding drops metadata, as upload pipelines do; a metadata detector abstains on perturbed images.
Blur and downscale keep the source's format family: JPEG sources are re-saved as JPEG q=95 (a lossless
save would turn every real photo into a PNG and hand detectors the format shortcut), everything else as
PNG. ``normalized`` is the shortcut check: every image as JPEG q=90, shortest side 256, centre crop 256.
``feedpost`` is no robustness perturbation but a re-presentation: the image as a post in a screenshot of a
social feed (`FeedPost`, the training twins' drawing), the commonest way a platform meets an image again. A
generated image screenshotted in a feed is still generated content; it is scored apart from the sweep. So is
``meme``: the image with a meme's caption over it or in a band above it, re-saved as JPEG (`Meme`).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageFilter

from streamguard.config import IntakeSettings
from streamguard.intake import decode_image
from streamguard.training.memes import MEME_VERSION, Meme
from streamguard.training.renders import FEED_VERSION, FeedPost

NONE = "none"
NORMALIZED = "normalized"
FEED_POST = "feedpost"
MEME = "meme"
# Asked by name only, scored apart from the sweep: what a platform re-presents an image as, not a degradation.
REPRESENTATIONS = (FEED_POST, MEME)
# Part of every cached score of a perturbed image: bump it when a perturbation's output changes.
PERTURB_VERSION = "2"
_KEEP_JPEG_QUALITY = 95
_SOCIAL_LONG_SIDE = 1080
_SOCIAL_QUALITY = 75
_NORMALIZED_SIDE = 256
_NORMALIZED_QUALITY = 90


@dataclass(frozen=True)
class Perturbation:
    name: str
    group: str  # what ``--perturb`` may name instead of listing each member
    level: float  # the swept parameter (JPEG quality, blur sigma, scale factor), for plots
    apply: Callable[[Image.Image, str], bytes]  # (decoded RGB, source format) -> encoded bytes
    version: str = PERTURB_VERSION  # in every cached score of it: a perturbation drawn from elsewhere adds that


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _like_source(img: Image.Image, source_format: str) -> bytes:
    if source_format == "JPEG":
        return _encode(img, "JPEG", quality=_KEEP_JPEG_QUALITY)
    # Lossless either way; the fastest zlib level keeps blur sweeps of large PNGs from being encode-bound.
    return _encode(img, "PNG", compress_level=1)


def _jpeg(quality: int) -> Callable[[Image.Image, str], bytes]:
    return lambda img, _fmt: _encode(img, "JPEG", quality=quality)


def _blur(sigma: float) -> Callable[[Image.Image, str], bytes]:
    return lambda img, fmt: _like_source(img.filter(ImageFilter.GaussianBlur(radius=sigma)), fmt)


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, Image.Resampling.BICUBIC)


def _downscale(factor: float) -> Callable[[Image.Image, str], bytes]:
    def apply(img: Image.Image, fmt: str) -> bytes:
        w, h = img.size
        return _like_source(_resize(img, (max(1, round(w * factor)), max(1, round(h * factor)))), fmt)

    return apply


def _social(img: Image.Image, _fmt: str) -> bytes:
    w, h = img.size
    long_side = max(w, h)
    if long_side > _SOCIAL_LONG_SIDE:
        scale = _SOCIAL_LONG_SIDE / long_side
        img = _resize(img, (max(1, round(w * scale)), max(1, round(h * scale))))
    return _encode(img, "JPEG", quality=_SOCIAL_QUALITY)


def _feed_post(img: Image.Image, _fmt: str) -> bytes:
    return FeedPost()(_encode(img, "PNG", compress_level=1))


def _meme(img: Image.Image, _fmt: str) -> bytes:
    return Meme()(_encode(img, "PNG", compress_level=1))


def _normalized(img: Image.Image, _fmt: str) -> bytes:
    w, h = img.size
    scale = _NORMALIZED_SIDE / min(w, h)
    # Rounding must not leave the short side at 255: it is the crop size.
    size = (max(_NORMALIZED_SIDE, round(w * scale)), max(_NORMALIZED_SIDE, round(h * scale)))
    img = _resize(img, size)
    left, top = (size[0] - _NORMALIZED_SIDE) // 2, (size[1] - _NORMALIZED_SIDE) // 2
    img = img.crop((left, top, left + _NORMALIZED_SIDE, top + _NORMALIZED_SIDE))
    return _encode(img, "JPEG", quality=_NORMALIZED_QUALITY)


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p
    for p in (
        Perturbation("jpeg95", "jpeg", 95, _jpeg(95)),
        Perturbation("jpeg75", "jpeg", 75, _jpeg(75)),
        Perturbation("jpeg50", "jpeg", 50, _jpeg(50)),
        Perturbation("jpeg30", "jpeg", 30, _jpeg(30)),
        Perturbation("blur1", "blur", 1, _blur(1)),
        Perturbation("blur2", "blur", 2, _blur(2)),
        Perturbation("blur3", "blur", 3, _blur(3)),
        Perturbation("downscale0.5", "downscale", 0.5, _downscale(0.5)),
        Perturbation("downscale0.25", "downscale", 0.25, _downscale(0.25)),
        Perturbation("social", "social", 0, _social),
        Perturbation(NORMALIZED, NORMALIZED, 0, _normalized),
        Perturbation(FEED_POST, FEED_POST, 0, _feed_post, f"{PERTURB_VERSION}.{FEED_VERSION}"),
        Perturbation(MEME, MEME, 0, _meme, f"{PERTURB_VERSION}.{MEME_VERSION}"),
    )
}
# The robustness sweep: the same content, degraded. The shortcut check and the re-presentations are asked by name.
SWEEP = tuple(name for name, p in PERTURBATIONS.items() if p.group not in (NORMALIZED, *REPRESENTATIONS))
GROUPS = tuple(dict.fromkeys(PERTURBATIONS[name].group for name in SWEEP))


def parse_perturbations(spec: str) -> list[str]:
    """``none``, ``all``, or a comma list of groups (jpeg, blur, downscale, social) and names (jpeg75;
    feedpost and meme: never in ``all``, re-presentations rather than degradations).

    Returns the perturbations to run, in canonical order; raises ValueError on an unknown name.
    """
    wanted: set[str] = set()
    for token in (t.strip().lower() for t in spec.split(",")):
        if token in ("", NONE):
            continue
        if token == "all":
            wanted.update(SWEEP)
        elif token in GROUPS:
            wanted.update(n for n in SWEEP if PERTURBATIONS[n].group == token)
        elif token in SWEEP or token in REPRESENTATIONS:
            wanted.add(token)
        else:
            raise ValueError(f"unknown perturbation {token!r}; choose from none, all, "
                             f"{', '.join(GROUPS + SWEEP + REPRESENTATIONS)}")
    return [name for name in (*SWEEP, *REPRESENTATIONS) if name in wanted]


def perturb(name: str, data: bytes, limits: IntakeSettings | None = None) -> bytes:
    """``data`` with perturbation ``name`` applied (``none`` returns it unchanged).

    Raises the intake's typed errors for bytes that do not decode, like the scorer would.
    """
    if name == NONE:
        return data
    image = decode_image(data, limits or IntakeSettings())
    return PERTURBATIONS[name].apply(image.rgb, image.format)


def cache_tag(name: str) -> str:
    """The perturbation as a score-cache key part: versioned, so a changed perturbation is never reused."""
    return name if name == NONE else f"{name}@{PERTURBATIONS[name].version}"
