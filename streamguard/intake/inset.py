"""The photo inside a screenshot: where an app shows a picture amid its own flat chrome.

A screenshot of a post is the commonest way an image is re-shared, and the chrome around the picture is a
strong "real" cue to a detector that saw only real screens (validation step 31: the shipped default cleared
47% of held-out generations shown as feed posts). Judging the picture the screen shows, not the screen, takes
that cue away without teaching the model anything new.

The rule is geometric, not learned: an app draws flat colour (backgrounds, bars, buttons) and text, a photo is
continuous tone. On a reduced grey copy, blocks whose pixels barely vary are flat; the largest rectangle of
blocks that are not is the candidate. It is an inset only when the rest of the image is mostly flat (a photo
with a clear sky has its sky as its only flat part, and that part is not the rest of a screen), when it is
large enough to be judged and not the whole image, and when it is not text (a paragraph is busy at block
scale, but one grey level, its background, covers most of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

INSET_VERSION = 1
_WORK_SIDE = 512  # the long side the search runs at: a phone screen's photo stays ~30 blocks wide
_BLOCK = 8
_FLAT_RANGE = 1  # grey levels a block may span and still be flat colour (JPEG leaves flat chrome near-flat)
_CHROME_SHARE = 0.03  # of all blocks: how many flat blocks of one grey level make it a colour the screen uses
_MIN_CHROME_BLOCKS = 4


@dataclass(frozen=True)
class InsetRules:
    min_share: float = 0.12  # of the image's area: smaller pictures are thumbnails, not what the post shows
    max_share: float = 0.90  # a larger one is the image itself with a border
    min_chrome_outside: float = 0.3  # of the blocks outside the rectangle, in the screen's flat colours
    max_dominant: float = 0.35  # of the rectangle's pixels within 3 levels of its commonest grey: text above
    min_side: int = 96  # native pixels, the shorter side of the inset


def find_inset(image: Image.Image, rules: InsetRules = InsetRules()) -> tuple[int, int, int, int] | None:
    """The box (left, top, right, bottom) of the photo a screenshot shows, in ``image``'s pixels; None when
    ``image`` does not look like a screen around a photo."""
    w, h = image.size
    scale = min(1.0, _WORK_SIDE / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    grey = image.convert("L")
    if size != (w, h):
        grey = grey.resize(size, Image.Resampling.BOX)
    pixels = np.asarray(grey, dtype=np.int16)
    rows, cols = pixels.shape[0] // _BLOCK, pixels.shape[1] // _BLOCK
    if rows < 4 or cols < 4:
        return None
    blocks = pixels[:rows * _BLOCK, :cols * _BLOCK].reshape(rows, _BLOCK, cols, _BLOCK)
    spread = blocks.max(axis=(1, 3)) - blocks.min(axis=(1, 3))
    flat = spread <= _FLAT_RANGE
    levels = np.rint(blocks.mean(axis=(1, 3))).astype(np.int64)
    colours = _screen_colours(levels, flat)
    busy = ~(flat & colours[levels])
    top, left, bottom, right = _largest_rectangle(busy)
    area = (bottom - top) * (right - left)
    if area == 0 or not rules.min_share <= area / (rows * cols) <= rules.max_share:
        return None
    outside = ~busy
    outside[top:bottom, left:right] = False
    if outside.sum() < rules.min_chrome_outside * (rows * cols - area):
        return None
    inner = pixels[top * _BLOCK:bottom * _BLOCK, left * _BLOCK:right * _BLOCK]
    levels = np.bincount(inner.ravel(), minlength=256)
    mode = int(levels.argmax())
    if levels[max(0, mode - 3):mode + 4].sum() > rules.max_dominant * inner.size:
        return None
    # The rectangle's blocks on a side with chrome beyond it may straddle the frame: their lines of chrome
    # are shaved off, one reduced pixel line at a time, so the box holds the photo and no chrome.
    y0, y1 = top * _BLOCK, min(bottom * _BLOCK, pixels.shape[0]) if bottom < rows else pixels.shape[0]
    x0, x1 = left * _BLOCK, min(right * _BLOCK, pixels.shape[1]) if right < cols else pixels.shape[1]
    while top > 0 and y0 < y1 - 1 and _chrome_line(pixels[y0, x0:x1], colours) and y0 < (top + 1) * _BLOCK:
        y0 += 1
    while bottom < rows and y1 > y0 + 1 and _chrome_line(pixels[y1 - 1, x0:x1], colours) and y1 > (bottom - 1) * _BLOCK:
        y1 -= 1
    while left > 0 and x0 < x1 - 1 and _chrome_line(pixels[y0:y1, x0], colours) and x0 < (left + 1) * _BLOCK:
        x0 += 1
    while right < cols and x1 > x0 + 1 and _chrome_line(pixels[y0:y1, x1 - 1], colours) and x1 > (right - 1) * _BLOCK:
        x1 -= 1
    box = (round(x0 / scale), round(y0 / scale), min(w, round(x1 / scale)), min(h, round(y1 / scale)))
    if min(box[2] - box[0], box[3] - box[1]) < rules.min_side:
        return None
    return box


def _screen_colours(levels: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """The grey levels (a mask over 0-255) the screen paints its chrome in: those many flat blocks share. An
    app paints its background, bars and cards each in one exact colour; a photo's smooth parts (a blurred
    background, a sky) drift from block to block, so they stay part of the photo."""
    counts = np.bincount(levels[flat], minlength=256)
    common = counts >= max(_MIN_CHROME_BLOCKS, _CHROME_SHARE * flat.size)
    # A level's neighbours too: JPEG and the reduction move a flat colour by a level or so.
    near = common.copy()
    near[1:] |= common[:-1]
    near[:-1] |= common[1:]
    return near


def _chrome_line(line: np.ndarray, colours: np.ndarray) -> bool:
    """Whether a line of reduced pixels is one of the screen's flat colours from end to end."""
    return int(line.max()) - int(line.min()) <= _FLAT_RANGE and bool(colours[int(round(float(line.mean())))])


def _largest_rectangle(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), exclusive ends, of the largest all-True rectangle of ``mask``: the
    histogram-of-heights method, one stack pass a row."""
    rows, cols = mask.shape
    heights = np.zeros(cols + 1, dtype=np.int64)  # a zero sentinel closes every bar at the row's end
    best = (0, 0, 0, 0, 0)
    for r in range(rows):
        heights[:cols] = np.where(mask[r], heights[:cols] + 1, 0)
        stack: list[int] = []
        for c in range(cols + 1):
            while stack and heights[stack[-1]] >= heights[c]:
                height = int(heights[stack.pop()])
                left = stack[-1] + 1 if stack else 0
                area = height * (c - left)
                if area > best[0]:
                    best = (area, r + 1 - height, left, r + 1, c)
            stack.append(c)
    return best[1], best[2], best[3], best[4]
