"""What the default CLIP detectors cost against univfd alone: pin-clip (on by default since 2026-12-04)
branches off the shared trunk at block 10, so beside univfd it should add its two tuned blocks and a head
an image (12 + 2 block passes instead of 12), not a second encoder. Both variants are real `Scorer`s on the
shared trunk, in-process, timed on `Scorer.judge` over the same images decoded beforehand, alternating within
each round (the best round of each counts). A third variant is the default with univfd judging each view's
mirror image too (``views = "resize-flip-inset"``, measured in docs/validation.md step 36): its contract is
no longer pin-clip's, so it costs univfd a trunk pass of its own on two views. Prints images/s of each and
the ratios; writes JSON.

    .venv/bin/python bench/bench_default_cost.py [--images 16] [--repeat 3] [--out bench/results/default_cost.json]

Needs the real backbone (``streamguard backbone fetch``, run by ``make``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import machine
from synthetic import photo_jpeg
from streamguard.config import load_settings
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer

SIZES = [(1280, 960), (640, 480), (512, 512), (1024, 768)]
BOTH = ["pin-clip", "univfd"]


class Variant(NamedTuple):
    deny: list[str]  # plugins left out
    loads: list[str]  # the detectors that must load
    options: dict[str, Any]  # detectors.options


# The baseline denies pin-clip; the default is the plugin settings' defaults (which must load both).
VARIANTS = {"univfd_alone": Variant(["builtin-pinclip"], ["univfd"], {}), "default": Variant([], BOTH, {}),
            "default_flip": Variant([], BOTH, {"univfd": {"views": "resize-flip-inset"}})}


def _scorer(variant: Variant, batch_size: int, name: str) -> Scorer:
    # provenance and credentials read metadata only; left out so that the ratio is the CLIP detectors'.
    settings = load_settings(plugins={"deny": ["provenance", "builtin-credentials", *variant.deny]},
                             detectors={"shared_trunk": True, "timeout_s": None, "batch_size": batch_size,
                                        "options": variant.options})
    scorer = Scorer(settings, build_plugin_manager(settings.plugins)).start()
    loaded = sorted(r.spec.name for r in scorer.runners if r.load_error is None)
    if loaded != variant.loads:
        scorer.close()
        raise SystemExit(f"{name}: expected {variant.loads} to load, got {loaded}")
    return scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/default_cost.json"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="Rounds; the best of each variant counts.")
    args = parser.parse_args()

    jobs = [ImageJob(f"img-{i}", photo_jpeg(SIZES[i % len(SIZES)], i)) for i in range(args.images)]
    scorers = {name: _scorer(variant, args.batch_size, name) for name, variant in VARIANTS.items()}
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        decoded = {name: scorer.decode(jobs) for name, scorer in scorers.items()}
        for name, scorer in scorers.items():
            scorer.judge(decoded[name][:2])  # warm-up: first-call allocations, kernel selection
        for _ in range(args.repeat):
            for name, scorer in scorers.items():
                for outcome in decoded[name]:
                    outcome.verdict = None
                start = time.perf_counter()
                scorer.judge(decoded[name])
                seconds[name].append(time.perf_counter() - start)
                failed = [s.detector for o in decoded[name] for s in o.verdict.scores if s.error]  # type: ignore[union-attr]
                if failed:
                    raise SystemExit(f"{name}: detectors failed: {sorted(set(failed))}")
    finally:
        for scorer in scorers.values():
            scorer.close()

    n = len(jobs)
    alone, default, flip = min(seconds["univfd_alone"]), min(seconds["default"]), min(seconds["default_flip"])
    result: dict[str, Any] = {
        "benchmark": "default_clip_detectors_vs_univfd_alone",
        "images": n,
        "image_sizes": [f"{w}x{h}" for w, h in SIZES],
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        # default_flip: univfd's own 12 on each of two views, pin-clip's 10 frozen and 2 tuned on one.
        "block_passes_per_image": {"univfd_alone": 12, "default": 14, "default_flip": 36},
        "baseline_univfd_alone_images_per_s": round(n / alone, 3),
        "default_images_per_s": round(n / default, 3),
        "cost_ratio_vs_baseline": round(default / alone, 3),
        "default_flip_images_per_s": round(n / flip, 3),
        "default_flip_cost_ratio_vs_baseline": round(flip / alone, 3),
        "default_flip_cost_ratio_vs_default": round(flip / default, 3),
        "seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
    }
    print(f"univfd alone (baseline)        : {n / alone:7.3f} images/s")
    print(f"default (univfd and pin-clip)  : {n / default:7.3f} images/s  {default / alone:.2f}x the time")
    print(f"default, univfd on the mirror too: {n / flip:7.3f} images/s  {flip / alone:.2f}x the time "
          f"({flip / default:.2f}x the default's)")
    result.update(machine.record(load_before))
    machine.write(args.out, result)
    print(f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs -> {args.out}")


if __name__ == "__main__":
    main()
