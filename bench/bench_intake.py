"""Intake benchmark: decoding a large JPEG for a 224-px detector with Pillow's draft mode (what the
pipeline does) against the naive full-size decode followed by the same resize, same images, same run.

A second set times the ``-inset`` view (the photo a screenshot shows) on JPEG screenshots of posts: the
draft decode, with the photo decoded again where the reduced screen holds it under 224 px (what the pipeline
does), against decoding every screenshot at full size, and beside the draft decode that enlarges the held
pixels instead (inset version 1: cheaper, but the photo loses the detail between its held and its view size).

    .venv/bin/python bench/bench_intake.py [--out bench/results/intake.json]

Prints images/s and the ratios; writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from synthetic import photo_jpeg
from streamguard.config import IntakeSettings
from streamguard.intake import InputContract, decode_image, prepare
from streamguard.intake.contract import with_views

SIZES = [(4032, 3024), (3000, 2000), (1920, 1080)]


def _jpeg(size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    # Smooth content plus mild noise compresses like a photo, unlike pure noise.
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 90.0), np.cos(y / 70.0), np.sin((x + y) / 150.0)], axis=-1) * 100 + 128
    img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# (screen, the post's photo, where it sits): a phone with a landscape photo (held at 270x142 by the screen's
# quarter-scale decode: decoded again), with a square one (held at 270 px: not), and a desktop's column.
SCREENS = [((1080, 2340), (1080, 565), (0, 380)), ((1080, 2340), (1080, 1080), (0, 380)),
           ((1920, 1080), (820, 640), (550, 250))]


def _screenshot(screen: tuple[int, int], photo: tuple[int, int], at: tuple[int, int], seed: int) -> bytes:
    image = Image.new("RGB", screen, (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, screen[0], 90), fill=(235, 236, 240))
    for k in range(8):
        draw.text((40, at[1] + photo[1] + 30 + 40 * k), "a comment and its replies, one line", fill=(20, 20, 20),
                  font_size=28)
    image.paste(Image.open(io.BytesIO(photo_jpeg(photo, seed))), at)  # a photo posted as a camera saved it
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _run(images: list[bytes], min_side: int | None, contract: InputContract, repeat: int,
         enlarge_held: bool = False) -> float:
    limits = IntakeSettings()
    start = time.perf_counter()
    for _ in range(repeat):
        for data in images:
            image = decode_image(data, limits, min_side=min_side)
            # Without its bytes, an image cannot be decoded again: the photo is cut from the held pixels.
            prepare(replace(image, data=b"") if enlarge_held else image, contract)
    return repeat * len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/intake.json"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    images = [_jpeg(size, seed) for seed, size in enumerate(SIZES)]
    contract = InputContract(size=224)
    _run(images[:1], None, contract, 1)  # warm-up
    naive = _run(images, None, contract, args.repeat)
    draft = _run(images, contract.size, contract, args.repeat)
    shots = [_screenshot(*layout, seed) for seed, layout in enumerate(SCREENS)]
    inset = with_views(contract, "resize-inset")
    _run(shots[:1], None, inset, 1)
    shots_native = _run(shots, None, inset, args.repeat * 3)
    shots_draft = _run(shots, contract.size, inset, args.repeat * 3)
    shots_held = _run(shots, contract.size, inset, args.repeat * 3, enlarge_held=True)
    result = {
        "benchmark": "intake_jpeg_to_224",
        "images": [f"{w}x{h}" for w, h in SIZES],
        "repeat": args.repeat,
        "baseline_full_decode_images_per_s": round(naive, 2),
        "draft_decode_images_per_s": round(draft, 2),
        "ratio_vs_baseline": round(draft / naive, 2),
        "inset_screenshots": [f"{w}x{h}" for (w, h), _, _ in SCREENS],
        "inset_baseline_full_decode_images_per_s": round(shots_native, 2),
        "inset_draft_decode_images_per_s": round(shots_draft, 2),
        "inset_ratio_vs_baseline": round(shots_draft / shots_native, 2),
        "inset_draft_held_pixels_images_per_s": round(shots_held, 2),
        "inset_held_pixels_ratio_vs_baseline": round(shots_held / shots_native, 2),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"full decode + resize : {naive:8.2f} images/s (baseline)")
    print(f"draft decode + resize: {draft:8.2f} images/s")
    print(f"ratio                : {draft / naive:8.2f}x")
    print(f"screenshots, -inset view: full decode {shots_native:8.2f} images/s (baseline)")
    print(f"  draft decode, photo decoded again where held small {shots_draft:8.2f} images/s "
          f"{shots_draft / shots_native:.2f}x")
    print(f"  draft decode, held pixels enlarged (inset 1)       {shots_held:8.2f} images/s "
          f"{shots_held / shots_native:.2f}x  -> {args.out}")


if __name__ == "__main__":
    main()
