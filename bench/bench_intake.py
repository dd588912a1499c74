"""Intake benchmark: decoding a large JPEG for a 224-px detector with Pillow's draft mode (what the
pipeline does) against the naive full-size decode followed by the same resize, same images, same run.

    .venv/bin/python bench/bench_intake.py [--out bench/results/intake.json]

Prints images/s for both and their ratio; writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from streamguard.config import IntakeSettings
from streamguard.intake import InputContract, decode_image, prepare

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


def _run(images: list[bytes], min_side: int | None, contract: InputContract, repeat: int) -> float:
    limits = IntakeSettings()
    start = time.perf_counter()
    for _ in range(repeat):
        for data in images:
            prepare(decode_image(data, limits, min_side=min_side), contract)
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
    result = {
        "benchmark": "intake_jpeg_to_224",
        "images": [f"{w}x{h}" for w, h in SIZES],
        "repeat": args.repeat,
        "baseline_full_decode_images_per_s": round(naive, 2),
        "draft_decode_images_per_s": round(draft, 2),
        "ratio_vs_baseline": round(draft / naive, 2),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"full decode + resize : {naive:8.2f} images/s (baseline)")
    print(f"draft decode + resize: {draft:8.2f} images/s")
    print(f"ratio                : {draft / naive:8.2f}x  -> {args.out}")


if __name__ == "__main__":
    main()
