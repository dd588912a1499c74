"""What each detector wants as input, and the one function that produces it.

Two fits cover the detectors in this field:
- ``resize`` (semantic detectors, CLIP): shortest side resized to ``size`` with bicubic filtering, then a
  centre crop; a large JPEG may be decoded at reduced size first, since the resize would discard the
  detail anyway.
- ``crop`` (noise/imprint detectors): native pixels, centre crop of ``size``; images smaller than that are
  mirror-padded. Resizing would erase the high-frequency imprint these detectors read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from streamguard.intake.decode import DecodedImage

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class InputContract:
    size: int = 224
    fit: Literal["resize", "crop"] = "resize"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError("size must be positive")
        if self.fit not in ("resize", "crop"):
            raise ValueError(f"fit must be 'resize' or 'crop', not {self.fit!r}")


def decode_side(contracts: Iterable[InputContract | None]) -> int | None:
    """The smallest side a shared decode may produce so that every contract is served; None = native."""
    sides = []
    for contract in contracts:
        if contract is None:
            continue
        if contract.fit == "crop":
            return None
        sides.append(contract.size)
    return max(sides) if sides else None


def prepare(image: DecodedImage, contract: InputContract) -> np.ndarray:
    """The detector's input: float32, shape (3, size, size), normalised by the contract's mean and std.

    Only the region that survives the centre crop is ever resampled or copied, so nothing larger than the
    output is allocated whatever the image's shape."""
    if contract.fit == "resize":
        pixels = _resize_center_crop(image.rgb, contract.size)
    else:
        if image.reduced:
            raise ValueError("a crop contract needs native pixels but the image was decoded reduced")
        pixels = _center_crop_pad(image.rgb, contract.size)
    arr = pixels.astype(np.float32) / 255.0
    arr = (arr - np.asarray(contract.mean, np.float32)) / np.asarray(contract.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


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
    crop_w, crop_h = min(w, size), min(h, size)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    # Crop before converting to an array: np.asarray of the whole image would copy every native pixel.
    arr = np.asarray(img.crop((left, top, left + crop_w, top + crop_h)))
    pad_h, pad_w = size - crop_h, size - crop_w
    if pad_h or pad_w:
        # Mirror padding keeps the local noise statistics that a constant border would destroy.
        arr = np.pad(
            arr, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)), mode="symmetric"
        )
    return arr
