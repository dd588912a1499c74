"""What each detector wants as input, and the one function that produces it.

Two fits cover the detectors in this field:
- ``resize`` (semantic detectors, CLIP): shortest side resized to ``size`` with bicubic filtering, then a
  centre crop; a large JPEG may be decoded at reduced size first, since the resize would discard the
  detail anyway.
- ``crop`` (noise/imprint detectors): native pixels, centre crop of ``size``; images smaller than that are
  mirror-padded. Resizing would erase the high-frequency imprint these detectors read.

A ``crop`` contract may ask for several ``crops`` spread over the image (and the resized ``whole`` view
beside them): the detector scores each view and the runner aggregates their logits into one (mean, or a
trimmed mean that drops the extremes), never a max, which would let one odd patch decide (SAFE, B-Free and
SPAI aggregate the same way). Views are placed deterministically, so a replayed image gets the same score.

Any contract may ask for each view's mirror image too (``flip``), aggregated with the views, so a score does
not hang on which way the picture faces; and for the ``inset`` first: when the image is a screenshot around a
photo (`find_inset`), the views are cut from that photo, not from the screen, so the app's chrome does not
speak for the picture. ``jpeg`` re-encodes the pixels the views are cut from as a JPEG of that quality
first, so every upload is judged in one format whatever it arrived as: a lossless PNG cannot look generated
for being lossless ("Fake or JPEG?", arXiv 2403.17608). A resize contract encodes them at one scale for
every format, `JPEG_SCALE` times its view's size on the short side (a JPEG upload is decoded at a reduced
scale and a PNG whole, so encoding what each decode holds would mark the formats apart): artefacts at the
view's own scale are what the detectors read as generated (each view encoded at 224 px cost univfd 0.049
and pin-clip 0.031 of their held-out AUC, docs/validation.md step 39).
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image

from streamguard.intake.decode import DecodedImage, decode_box
from streamguard.intake.inset import INSET_VERSION, find_inset

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# torchvision's ImageNet statistics: what DINOv2 (and most non-CLIP backbones) were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputContract:
    size: int = 224
    fit: Literal["resize", "crop"] = "resize"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crops: int = 1  # native crops spread over the image (fit "crop")
    whole: bool = False  # also the resized whole view (fit "crop")
    aggregate: Literal["mean", "trimmed-mean"] = "mean"
    # An image whose short side is under ``size`` (fit "crop") holds no native crop: mirror-padded ("pad"), or
    # judged on its resized view alone ("resize"), for a model trained on resized views, to which a tiled
    # thumbnail is foreign (the shipped univfd on 32 px CIFAKE photos: AUC 0.67 resized, 0.53 padded).
    small_image: Literal["pad", "resize"] = "pad"
    inset: bool = False  # judge the photo a screenshot shows, where `find_inset` finds one
    flip: bool = False  # each view's left-right mirror image beside it
    jpeg: int | None = None  # the shown pixels re-encoded as a JPEG of this quality before any view is cut

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError("size must be positive")
        if self.fit not in ("resize", "crop"):
            raise ValueError(f"fit must be 'resize' or 'crop', not {self.fit!r}")
        if self.crops < 1:
            raise ValueError("crops must be at least 1")
        if (self.crops > 1 or self.whole) and self.fit != "crop":
            raise ValueError("several views (crops > 1, whole) need fit 'crop'")
        if self.aggregate not in ("mean", "trimmed-mean"):
            raise ValueError(f"aggregate must be 'mean' or 'trimmed-mean', not {self.aggregate!r}")
        if self.small_image not in ("pad", "resize"):
            raise ValueError(f"small_image must be 'pad' or 'resize', not {self.small_image!r}")
        if self.jpeg is not None and not 1 <= self.jpeg <= 95:
            raise ValueError(f"jpeg must be a quality from 1 to 95, not {self.jpeg!r}")

    @property
    def multiview(self) -> bool:
        """Whether `prepare_views` (several views per image) rather than `prepare` makes the input."""
        return self.crops > 1 or self.whole or self.flip


RESIZE = "resize"  # the view name of the contract as a detector declares it
INSET = "-inset"  # a view name's suffix for the photo inside a screenshot
JPEG = "-jpeg"  # a view name's suffix for the shown pixels re-encoded as a JPEG first
# q75: the quality the robustness aim is measured at, inside training's JPEG range (training/data.py).
JPEG_QUALITY = 75
# The decoding's own reducing gap (decode.py): a resize from there to the view averages the blocks away.
JPEG_SCALE = 3
# -trimmed follows crops only: the one resized view (and its mirror) leaves nothing to trim.
_VIEW = re.compile(r"^(resize|crops(\d+)(\+whole)?(-trimmed)?)(-flip)?(-inset)?(-jpeg)?$")


def with_views(base: InputContract, view: str) -> InputContract:
    """``base`` under a view name: ``resize`` (``base`` itself), ``cropsN`` (N native crops) or
    ``cropsN+whole`` (and the resized whole view), with ``-trimmed`` for a trimmed mean of their logits, then
    ``-flip`` for each view's mirror image too, then ``-inset`` to cut them from the photo a screenshot shows
    (`find_inset`), then ``-jpeg`` to re-encode what is shown as a JPEG of `JPEG_QUALITY` first. The names
    `detectors.options.<name>.views` and `streamguard train loso-variants` use."""
    match = _VIEW.match(view)
    if match is None:
        raise ValueError(f"views must be resize, cropsN or cropsN+whole (crops optionally -trimmed), then "
                         f"optionally -flip, then optionally -inset, then optionally -jpeg, not {view!r}")
    contract = replace(base, flip=base.flip or bool(match.group(5)), inset=base.inset or bool(match.group(6)),
                       jpeg=JPEG_QUALITY if match.group(7) else base.jpeg)
    if match.group(1) == RESIZE:
        return contract
    return replace(contract, fit="crop", crops=int(match.group(2)), whole=bool(match.group(3)),
                   aggregate="trimmed-mean" if match.group(4) else "mean")


def view_tag(view: str) -> str:
    """``view`` as a model version names it: an inset view carries the rule's version and a re-encoded one its
    quality, so a changed rule or quality is a changed version (and dedupe does not reuse verdicts made
    under the old one)."""
    jpeg = view.endswith(JPEG)
    view = view.removesuffix(JPEG)
    view = f"{view}{INSET_VERSION}" if view.endswith(INSET) else view
    return f"{view}{JPEG}{JPEG_QUALITY}" if jpeg else view


def decode_side(contracts: Iterable[InputContract | None]) -> int | None:
    """The smallest side a shared decode may produce so that every contract is served; None = native."""
    sides = []
    for contract in contracts:
        if contract is None:
            continue
        if contract.fit == "crop":
            return None
        sides.append(_held_side(contract))
    return max(sides) if sides else None


def _held_side(contract: InputContract) -> int:
    """The short side a resize contract needs the shown pixels held at."""
    return contract.size * JPEG_SCALE if contract.jpeg is not None else contract.size


def prepare(image: DecodedImage, contract: InputContract) -> np.ndarray:
    """The detector's input: float32, shape (3, size, size), normalised by the contract's mean and std.

    Only the region that survives the centre crop is ever resampled or copied, so nothing larger than the
    output is allocated whatever the image's shape."""
    rgb = _shown(image, contract)
    if contract.fit == "resize" or _resized_instead(rgb, contract):
        pixels = _resize_center_crop(rgb, contract.size)
    else:
        if image.reduced:
            raise ValueError("a crop contract needs native pixels but the image was decoded reduced")
        pixels = _center_crop_pad(rgb, contract.size)
    return _normalized(np.asarray(pixels).transpose(2, 0, 1), contract)


def _shown(image: DecodedImage, contract: InputContract) -> Image.Image:
    """The pixels the contract's views are cut from: the image, or the photo inside it (``inset``); under
    ``jpeg``, as a JPEG of that quality (a resize contract's at `_held_side`, a crop contract's native)."""
    box = find_inset(image.rgb) if contract.inset else None
    side = _held_side(contract)
    # A decode reduced for the whole screen may hold the photo under the contract's size: decoded again then.
    rgb = image.rgb if box is None else decode_box(image, box, side)
    if contract.jpeg is None:
        return rgb
    return as_jpeg(rgb if contract.fit == "crop" else _short_side_at_most(rgb, side), contract.jpeg)


def _short_side_at_most(rgb: Image.Image, side: int) -> Image.Image:
    w, h = rgb.size
    if min(w, h) <= side:
        return rgb
    scale = side / min(w, h)
    return rgb.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BICUBIC)


def as_jpeg(rgb: Image.Image, quality: int) -> Image.Image:
    """``rgb`` encoded as a JPEG of ``quality`` and decoded again (Pillow's 4:2:0 subsampling, as training's
    augmentation encodes)."""
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as img:
        return img.convert("RGB")


def _resized_instead(rgb: Image.Image, contract: InputContract) -> bool:
    return contract.small_image == "resize" and min(rgb.size) < contract.size


def prepare_views(image: DecodedImage, contract: InputContract) -> np.ndarray:
    """Every view of a multi-view contract, normalised: (views, 3, size, size). The native crops come first
    (fewer than ``crops`` when the image is too small to hold that many distinct ones), then the whole view;
    under ``small_image = "resize"`` an image too small for one crop has its resized view alone; a resize
    contract has its one view. Under ``flip`` the mirror images follow, in the same order."""
    rgb = _shown(image, contract)
    if contract.fit == "resize" or _resized_instead(rgb, contract):
        views = [_resize_center_crop(rgb, contract.size)]
    else:
        if image.reduced:
            raise ValueError("a crop contract needs native pixels but the image was decoded reduced")
        w, h = rgb.size
        views = [crop_pad(rgb, contract.size, left, top)
                 for left, top in crop_boxes(w, h, contract.size, contract.crops)]
        if contract.whole:
            views.append(_resize_center_crop(rgb, contract.size))
    if contract.flip:
        views += [view[:, ::-1] for view in views]
    return _normalized(np.stack(views).transpose(0, 3, 1, 2), contract)


def _normalized(channels_first: np.ndarray, contract: InputContract) -> np.ndarray:
    """uint8 pixels, channels on the third axis from the end, as ``(x / 255 - mean) / std`` in float32.
    One contiguous copy then two in-place passes: the three-temporary form took 2.3 ms a 224-px image (this
    0.2 ms), as long as decoding it; the results differ from it by float32 rounding (< 1e-6)."""
    divisor, offset = _affine(contract.mean, contract.std)
    arr = np.ascontiguousarray(channels_first, dtype=np.float32)
    arr /= divisor  # a division, not a multiply: with mean 0 and std 1 it is exactly x / 255
    arr -= offset
    return arr


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (255.0 * s).astype(np.float32)[:, None, None], (m / s).astype(np.float32)[:, None, None]


def crop_boxes(width: int, height: int, size: int, crops: int) -> list[tuple[int, int]]:
    """Top-left corners of up to ``crops`` crops of ``size``, on a grid spread evenly over the image.

    Row-major on the smallest grid that holds ``crops``; positions that coincide (an image smaller than a
    crop in some direction) are kept once. Deterministic for a given image size.
    """
    cols = 1
    while cols * cols < crops:
        cols += 1
    rows = -(-crops // cols)
    if width < height:
        rows, cols = cols, rows  # more crops along the long side

    def spread(length: int, n: int) -> list[int]:
        # Centred on n equal tiles, clipped inside the image: together they cover it evenly.
        room = max(length - size, 0)
        return [min(max(round(length * (i + 0.5) / n - size / 2), 0), room) for i in range(n)]

    boxes: list[tuple[int, int]] = []
    for top in spread(height, rows):
        for left in spread(width, cols):
            if (left, top) not in boxes and len(boxes) < crops:
                boxes.append((left, top))
    return boxes


def aggregate_logits(logits: list[float | None], how: str) -> float | None:
    """One logit from a view's logits; views without one are left out, and None when no view has one."""
    values = sorted(v for v in logits if v is not None)
    if not values:
        return None
    if how == "trimmed-mean" and len(values) >= 4:
        values = values[1:-1]
    return sum(values) / len(values)


def _resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) == (w, h):
        return np.asarray(img.crop((left, top, left + size, top + size)))
    # The crop's box mapped back to source coordinates: resampling only it gives the pixels of resizing the
    # whole image then cropping (same filter taps), without the whole resize, which for a 1x100000 strip
    # would be 224x22400000.
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box))


def _center_crop_pad(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    return crop_pad(img, size, (w - min(w, size)) // 2, (h - min(h, size)) // 2)


def crop_pad(img: Image.Image, size: int, left: int, top: int) -> np.ndarray:
    """The ``size`` x ``size`` native pixels at (``left``, ``top``), mirror-padded where the image is smaller:
    what a crop-mode view is, in serving and in training alike."""
    w, h = img.size
    crop_w, crop_h = min(w, size), min(h, size)
    # Crop before converting to an array: np.asarray of the whole image would copy every native pixel.
    arr = np.asarray(img.crop((left, top, left + crop_w, top + crop_h)))
    pad_h, pad_w = size - crop_h, size - crop_w
    if pad_h or pad_w:
        # Mirror padding keeps the local noise statistics that a constant border would destroy.
        arr = np.pad(
            arr, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)), mode="symmetric"
        )
    return arr
