"""Portrait twins for the real class: a real training photo's person, cropped as a portrait is framed.

The only close-up faces in the generated class are StyleGAN2's (wild-train's tediGAN faces, every one aligned
and filling the frame); the real class holds a few dozen portraits among a thousand scenes. A probe can then
learn "a face fills the frame" as a cue to generated, and it shows: under leave-one-source-out the held-out
press portraits (faces-face-recognition) score a median of 0.54 fused and one of them sets `ai_threshold`
(docs/validation.md step 28). These twins give the real class that framing from photos it already holds:
each face the detector finds in a real training photo becomes a head-and-shoulders crop at the photo's own
pixels (no resampling: a real portrait's noise and JPEG grid stay as the camera left them), saved as a camera
saves. A twin keeps its photo's source (`twins`), so a held-out source's faces leave training with it.

Faces are found by OpenCV's frontal-face Haar cascade, which ships inside the opencv wheel (nothing is
downloaded): deterministic and small, and a missed face only means one twin fewer.

Measured, not shipped (docs/validation.md step 34): the press portraits move from uncertain to real, but the
ranking is unchanged and a night photo then sets a higher `ai_threshold`.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from streamguard.evaluation.datasets import Sample

# In the embedding cache key, the face cache's name and the LOSO folds' settings: a changed detector or
# framing must never read earlier rows.
PORTRAIT_VERSION = 1
# Faces are looked for on a copy whose longest side is at most this: a 12-megapixel photo costs the cascade
# seconds, and a face under DETECT_MIN pixels at this scale is too small to frame as a portrait anyway.
DETECT_SIDE = 1024
DETECT_MIN = 48
# A portrait's side as a multiple of the face's width: a tight head shot to head and shoulders (an aligned
# FFHQ crop, StyleGAN2's framing, is about 2.5x).
FRAMING = (2.0, 3.2)
# A twin smaller than this (its photo's face near an edge of a small photo) is no portrait worth training on.
MIN_SIDE = 128


def _cascade():  # type: ignore[no-untyped-def]
    try:
        import cv2
    except ImportError:
        raise RuntimeError("portrait twins find faces with OpenCV: pip install 'streamguard[eval]' "
                           "(opencv-python-headless)") from None
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError("OpenCV's frontal-face cascade did not load from its wheel")
    return cv2, cascade


def largest_face(image: Image.Image) -> tuple[int, int, int, int] | None:
    """The largest frontal face in ``image`` (already upright: callers apply its EXIF orientation) as (left,
    top, width, height) in its pixels, or None."""
    cv2, cascade = _cascade()
    grey = image.convert("L")
    scale = min(1.0, DETECT_SIDE / max(grey.size))
    if scale < 1:
        grey = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.Resampling.BILINEAR)
    found = cascade.detectMultiScale(np.asarray(grey), scaleFactor=1.1, minNeighbors=6,
                                     minSize=(DETECT_MIN, DETECT_MIN))
    if not len(found):
        return None
    x, y, w, h = max((tuple(int(v) for v in face) for face in found), key=lambda f: f[2] * f[3])
    return round(x / scale), round(y / scale), round(w / scale), round(h / scale)


def portrait_box(face: tuple[int, int, int, int], size: tuple[int, int], framing: float) -> tuple[int, int, int, int]:
    """The square crop (left, top, right, bottom) that frames ``face`` at ``framing`` times its width, a little
    below its centre (a portrait shows the shoulders, not the air above the head), moved inside the image and
    shrunk where the image is smaller."""
    x, y, w, h = face
    side = min(round(w * framing), *size)
    cx, cy = x + w / 2, y + h / 2 + 0.15 * h * framing
    left = min(max(0, round(cx - side / 2)), size[0] - side)
    top = min(max(0, round(cy - side / 2)), size[1] - side)
    return left, top, left + side, top + side


class PortraitCrop:
    """Real photo bytes -> the bytes of its portrait twin (JPEG); raises ValueError where no face frames one."""

    version = f"portrait-{PORTRAIT_VERSION}"
    suffix = "#portrait"

    def __call__(self, data: bytes) -> bytes:
        rng = random.Random(f"portrait:{PORTRAIT_VERSION}:{hashlib.sha256(data).hexdigest()}")
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        box = _framed(image, rng.uniform(*FRAMING))
        out = io.BytesIO()
        image.crop(box).save(out, format="JPEG", quality=rng.randint(88, 95))
        return out.getvalue()

    def frames(self, data: bytes) -> bool:
        """Whether ``data`` holds a face that frames a portrait (the twin would not raise): at the tightest
        framing, since a portrait's side only grows with it."""
        try:
            _framed(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), FRAMING[0])
        except ValueError:
            return False
        return True


def _framed(image: Image.Image, framing: float) -> tuple[int, int, int, int]:
    """The portrait box of ``image``'s largest face at ``framing``; ValueError where none frames one."""
    face = largest_face(image)
    if face is None:
        raise ValueError("no face to frame")
    box = portrait_box(face, image.size, framing)
    if box[2] - box[0] < MIN_SIDE:
        raise ValueError(f"the face frames a portrait of {box[2] - box[0]} px, under {MIN_SIDE}")
    return box


def with_faces(samples: Sequence[Sample], cache_dir: Path) -> list[Sample]:
    """The samples whose photo frames a portrait, looked up once per image in a cache under ``cache_dir`` (every
    LOSO fold asks about the same training photos)."""
    from streamguard.evaluation import read_samples

    path = cache_dir / f"portrait-faces-{PORTRAIT_VERSION}.json"
    known: dict[str, bool] = json.loads(path.read_text()) if path.is_file() else {}
    unknown = [s for s in samples if s.id not in known]
    if unknown:
        maker = PortraitCrop()
        for sample, data in read_samples(unknown):
            # An undecodable photo makes no twin, as embedding it would skip it too.
            try:
                known[sample.id] = maker.frames(data)
            except (OSError, ValueError, Image.DecompressionBombError):
                known[sample.id] = False
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, sort_keys=True))
    return [s for s in samples if known.get(s.id)]
