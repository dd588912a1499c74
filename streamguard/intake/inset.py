"""The photo inside a screenshot: where an app shows a picture amid its own flat chrome.

A screenshot of a post is the commonest way an image is re-shared, and the chrome around the picture is a
strong "real" cue to a detector that saw only real screens (validation step 31: the shipped default cleared
47% of held-out generations shown as feed posts). Judging the picture the screen shows, not the screen, takes
that cue away without teaching the model anything new.

The rule is geometric, not learned: an app paints flat colour (backgrounds, bars, cards), each in one exact
grey that many blocks share, and draws text; a photo is continuous tone, and even its smooth parts (a sky, a
blurred background) drift from block to block. On a reduced grey copy, the largest rectangle of blocks that
are not the screen's paint is the candidate. It is a photo inside a screen only when it is large enough to be
judged and not the whole image, when the rest is largely paint and the paint frames it (a photo's own
blown-out sky meets the rest of it along a ragged line, not a straight one), and when it is not text (a
paragraph is busy at block scale, but one grey level, its background, covers most of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# 2: the photo decoded again from the file where the screenshot's reduced decode held it under the view's size.
INSET_VERSION = 2
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
    # Of the blocks around the rectangle (one ring, or the next one out: a caption may sit right against the
    # photo), how many are chrome: a screen frames its photo, while a photo's own flat part (a clear sky, a
    # white backdrop) meets the rest of it along an irregular line. Set where 19 of 26 photos and generations
    # that met the other rules fail it, and 2.5% of feed posts do (validation step 33).
    min_frame: float = 0.35
    max_dominant: float = 0.35  # of the rectangle's pixels within 3 levels of its commonest grey; more is text
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
    if max(_ring_chrome(busy, (top, left, bottom, right), k) for k in (1, 2)) < rules.min_frame:
        return None
    inner = pixels[top * _BLOCK:bottom * _BLOCK, left * _BLOCK:right * _BLOCK]
    histogram = np.bincount(inner.ravel(), minlength=256)
    mode = int(histogram.argmax())
    if histogram[max(0, mode - 3):mode + 4].sum() > rules.max_dominant * inner.size:
        return None
    x0, y0, x1, y1 = _shaved(pixels, colours, (top, left, bottom, right))
    box = (round(x0 / scale), round(y0 / scale), min(w, round(x1 / scale)), min(h, round(y1 / scale)))
    if min(box[2] - box[0], box[3] - box[1]) < rules.min_side:
        return None
    return box


def _shaved(pixels: np.ndarray, colours: np.ndarray, rect: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``rect`` (blocks) as reduced pixels (x0, y0, x1, y1), each side with chrome beyond it moved in past the
    lines of chrome its outer block holds: that block may straddle the frame, and the box should hold the
    photo and no chrome. A side on the image's edge runs to the last pixel (past the last whole block)."""
    top, left, bottom, right = rect
    rows, cols = pixels.shape[0] // _BLOCK, pixels.shape[1] // _BLOCK
    y0, x0 = top * _BLOCK, left * _BLOCK
    y1 = bottom * _BLOCK if bottom < rows else pixels.shape[0]
    x1 = right * _BLOCK if right < cols else pixels.shape[1]
    if top > 0:
        while y0 < min((top + 1) * _BLOCK, y1 - 1) and _chrome_line(pixels[y0, x0:x1], colours):
            y0 += 1
    if bottom < rows:
        while y1 > max((bottom - 1) * _BLOCK, y0 + 1) and _chrome_line(pixels[y1 - 1, x0:x1], colours):
            y1 -= 1
    if left > 0:
        while x0 < min((left + 1) * _BLOCK, x1 - 1) and _chrome_line(pixels[y0:y1, x0], colours):
            x0 += 1
    if right < cols:
        while x1 > max((right - 1) * _BLOCK, x0 + 1) and _chrome_line(pixels[y0:y1, x1 - 1], colours):
            x1 -= 1
    return x0, y0, x1, y1


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


def _ring_chrome(busy: np.ndarray, rect: tuple[int, int, int, int], k: int) -> float:
    """The share of chrome among the blocks ``k`` blocks outside ``rect``, on its sides away from the image's
    edges; 1 when every side is an edge."""
    top, left, bottom, right = rect
    rows, cols = busy.shape
    ring = [busy[top - k, left:right]] if top - k >= 0 else []
    ring += [busy[bottom + k - 1, left:right]] if bottom + k - 1 < rows else []
    ring += [busy[top:bottom, left - k]] if left - k >= 0 else []
    ring += [busy[top:bottom, right + k - 1]] if right + k - 1 < cols else []
    return 1.0 - float(np.concatenate(ring).mean()) if ring else 1.0


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
