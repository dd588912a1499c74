"""Decode-thread benchmark: the scorer decoding and preparing a batch on its decode threads
(``intake.decode_threads``, default one per CPU) against doing it in the calling thread (``1``), same images,
same run, for light and heavy images.

    .venv/bin/python bench/bench_decode.py [--batch 32] [--repeat 5] [--out bench/results/decode.json]

Each set is a batch of seeded images: 64x64 noise PNGs (the worker benchmark's), and photo-like JPEGs at
640x480, 1600x1200 and 4032x3024. Each variant is a real `Scorer` with one detector that does nothing but
take a 224-px input (so `Scorer.score` is decode + prepare + a no-op), timed over ``--repeat`` rounds after
one warm-up batch (which also gives the scorer its measure of decode time, that decides whether the
threads are used for a batch); the best round counts. Prints images/s of both and the ratio per set;
writes JSON. Pillow decodes and resizes outside the GIL, so the threads can use every core on heavy images;
on light ones the scorer keeps to the calling thread, and the ratio should stay near 1.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import machine
from synthetic import photo_jpeg
from streamguard import DetectorInput, DetectorSpec, InputContract, hookimpl
from streamguard.config import load_settings
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer, decode_threads


class _Null:
    def predict(self, batch: Sequence[DetectorInput]) -> list[float]:
        return [0.0] * len(batch)

    def close(self) -> None:
        pass


class _Plugin:
    @hookimpl
    def register_detectors(self, register: Any) -> None:
        register(DetectorSpec(name="null", version="1", load=lambda ctx: _Null(), contract=InputContract(size=224)))


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _sets(batch: int) -> dict[str, list[ImageJob]]:
    out = {"png-64x64-noise": [ImageJob(f"p{i}", _png(i)) for i in range(batch)]}
    for size in ((640, 480), (1600, 1200), (4032, 3024)):
        n = batch if size[0] < 4000 else max(2, batch // 4)  # the largest are slow to make and to decode
        out[f"jpeg-{size[0]}x{size[1]}"] = [ImageJob(f"j{i}", photo_jpeg(size, i)) for i in range(n)]
    return out


def _rate(jobs: list[ImageJob], threads: int, repeat: int) -> tuple[float, float]:
    """Best images/s over ``repeat`` batches, and the mean decode ms per image of the last one."""
    settings = load_settings(plugins={"allow": ["builtin-fusion", "builtin-policy"]},
                             intake={"decode_threads": threads})
    pm = build_plugin_manager(settings.plugins)
    pm.register(_Plugin(), name="bench-null")
    with Scorer(settings, pm) as scorer:
        scorer.score(jobs)  # warm-up, and the decode-time measure
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            outcomes = scorer.score(jobs)
            best = min(best, time.perf_counter() - t0)
            assert all(o.verdict is not None for o in outcomes)
        return len(jobs) / best, sum(o.timings_ms["decode"] for o in outcomes) / len(outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode.json"))
    parser.add_argument("--batch", type=int, default=32, help="Images per batch (the worker's batch is 16).")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    threads = decode_threads(0)
    sets = {}
    for name, jobs in _sets(args.batch).items():
        one, one_ms = _rate(jobs, 1, args.repeat)
        many, many_ms = _rate(jobs, threads, args.repeat)
        sets[name] = {"images": len(jobs), "bytes_per_image": sum(len(j.data) for j in jobs) // len(jobs),
                      "calling_thread_images_per_s": round(one, 1), "decode_threads_images_per_s": round(many, 1),
                      "ratio": round(many / one, 2), "decode_ms_per_image": round(one_ms, 3),
                      "decode_ms_per_image_on_threads": round(many_ms, 3)}
        print(f"{name:20s} {sets[name]['bytes_per_image']:>9d} B  1 thread {one:8.1f} images/s  "
              f"{threads} threads {many:8.1f} images/s  {many / one:.2f}x  (decode {one_ms:.2f} ms/image)")
    result = {"benchmark": "decode_threads_vs_calling_thread", "decode_threads": threads, "batch": args.batch,
              "repeat": args.repeat, "sets": sets}
    result.update(machine.record(load_before))
    machine.write(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
