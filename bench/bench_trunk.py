"""Shared-trunk benchmark: the default CLIP detectors (univfd, pin-clip, mpft) judging the same images with
the shared trunk (``detectors.shared_trunk = true``: the frozen blocks once per batch, 12 + 2 + 2 block
passes an image) against today's separate models (``false``: 3 x 12), in-process, same images, same run.

    .venv/bin/python bench/bench_trunk.py [--images 16] [--repeat 2] [--runtime-variants] [--triton]
        [--out bench/results/trunk.json]

Each variant is a real `Scorer` (the worker's detection path: one runner thread per detector, batches of
``detectors.batch_size``), timed on `Scorer.judge` over images decoded beforehand, so the ratio is the
detectors' alone. With ``--repeat N`` the variants alternate within each round and the best round of each
counts, so a neighbouring process stealing CPU for a while biases neither. Prints images/s of each, the
ratio, and the largest difference between the two variants' raw logits per detector; writes JSON.
Needs the real backbone (``streamguard backbone fetch``, run by ``make``).

``--runtime-variants`` also times the shared trunk at torch int8-mixed and run by ONNX Runtime
(``backbone.runtime = "onnxruntime"``) at fp32 and int8-mixed, alternating with the others in the same rounds, against the torch shared trunk at
fp32: images/s ratio and the largest raw-logit difference per detector. Their graphs are exported into the
backbone cache at the first start (tens of seconds), before any timing.

``--triton`` also builds a repository with the shared trunk (``triton build --shared-trunk``), starts
tritonserver on this machine with the three detectors' own models and the shared-trunk ensemble, and
compares the worker's Triton path both ways on the same images: one request per detector's model against
one request per batch to the ensemble (``triton.trunk_model``), each checked against the in-process scores.
``--triton-url HOST:PORT`` measures a server you started instead: on a GPU node, the repository from
``streamguard triton build --device gpu --format onnx --shared-trunk`` (TensorRT fp16; see triton_repo/README.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import machine
from synthetic import photo_jpeg
from streamguard.config import Settings, load_settings
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Outcome, Scorer

DETECTORS = ("univfd", "pin-clip", "mpft")
PLUGINS = ("builtin-fusion", "builtin-policy", "builtin-univfd", "builtin-pinclip", "builtin-mpft")
SIZES = [(1280, 960), (640, 480), (512, 512), (1024, 768)]
# The faster shared trunks against torch fp32's (`shared_trunk`), by variant name: their `backbone` settings.
RUNTIMES: dict[str, dict[str, str]] = {
    "torch-int8-mixed": {"precision": "int8-mixed"},
    "ort-fp32": {"runtime": "onnxruntime", "precision": "fp32"},
    "ort-int8-mixed": {"runtime": "onnxruntime", "precision": "int8-mixed"},
}


def _settings(shared: bool, batch_size: int, **sections: Any) -> Settings:
    return load_settings(plugins={"allow": list(PLUGINS), "deny": []},
                         detectors={"shared_trunk": shared, "timeout_s": None, "batch_size": batch_size,
                                    **sections.pop("detectors", {})}, **sections)


def _judge(scorer: Scorer, decoded: list[Outcome]) -> tuple[float, dict[str, list[float]]]:
    for outcome in decoded:
        outcome.verdict = None
    start = time.perf_counter()
    scorer.judge(decoded)
    seconds = time.perf_counter() - start
    logits: dict[str, list[float]] = {name: [] for name in DETECTORS}
    for outcome in decoded:
        assert outcome.verdict is not None
        for score in outcome.verdict.scores:
            if score.error is not None or score.raw_logit is None:
                raise RuntimeError(f"{score.detector} failed: {score.error}")
            logits[score.detector].append(score.raw_logit)
    return seconds, logits


def _compare(variants: dict[str, Callable[[], Settings]], jobs: list[ImageJob],
             repeat: int) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """Seconds per round and raw logits of each variant, the variants alternating within each round."""
    scorers = {}
    decoded = {}
    for name, settings_of in variants.items():
        settings = settings_of()
        scorer = Scorer(settings, build_plugin_manager(settings.plugins)).start()
        loaded = sorted(runner.spec.name for runner in scorer.runners if runner.load_error is None)
        if loaded != sorted(DETECTORS):
            raise SystemExit(f"{name}: the default CLIP detectors did not all load: {loaded}")
        scorers[name] = scorer
        decoded[name] = scorer.decode(jobs)
        _judge(scorer, decoded[name][:2])  # warm-up: first-call allocations, kernel selection, channels
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    logits: dict[str, dict[str, list[float]]] = {}
    try:
        for _ in range(repeat):
            for name in variants:
                took, logits[name] = _judge(scorers[name], decoded[name])
                seconds[name].append(took)
    finally:
        for scorer in scorers.values():
            scorer.close()
    return seconds, logits


def _worst(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, float]:
    return {name: float(np.max(np.abs(np.subtract(a[name], b[name])))) for name in DETECTORS}


def _runtimes(n: int, seconds: dict[str, list[float]], logits: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The ONNX Runtime variants against the torch shared trunk at fp32 (``shared_trunk``)."""
    torch_fp32 = min(seconds["shared_trunk"])
    return {name: {"images_per_s": round(n / min(seconds[name]), 3),
                   "ratio_vs_torch_fp32_shared_trunk": round(torch_fp32 / min(seconds[name]), 2),
                   "max_abs_raw_logit_diff_vs_torch_fp32": _worst(logits[name], logits["shared_trunk"])}
            for name in RUNTIMES}


def _triton(jobs: list[ImageJob], args: argparse.Namespace, inprocess: dict[str, list[float]]) -> dict[str, Any]:
    from streamguard.devstack import start_triton
    from streamguard.triton.build import build_repository
    from streamguard.triton.shared_trunk import ENSEMBLE_MODEL

    if args.triton_url:
        return _through(args.triton_url, jobs, args, inprocess, f"tritonserver at {args.triton_url} (run by you)")
    with tempfile.TemporaryDirectory(prefix="bench-trunk-") as work:
        built = build_repository(Path(work) / "models", device="cpu", shared_trunk=True, models=list(DETECTORS))
        server = start_triton(Path(work) / "server", built.repository, [*DETECTORS, ENSEMBLE_MODEL], timeout_s=600)
        try:
            return _through(server.grpc_address, jobs, args, inprocess,
                            "tritonserver (nvidia-pytriton wheel), Python backend, CPU, on the same cores as the client")
        finally:
            server.stop()


def _through(url: str, jobs: list[ImageJob], args: argparse.Namespace, inprocess: dict[str, list[float]],
             server: str) -> dict[str, Any]:
    from streamguard.triton.shared_trunk import ENSEMBLE_MODEL

    common = {"url": url, "request_timeout_s": 600, "retry_budget_s": 60}
    variants = {
        "separate": lambda: _settings(False, args.batch_size, detectors={"backend": "triton"}, triton=common),
        "shared_trunk": lambda: _settings(True, args.batch_size, detectors={"backend": "triton"},
                                          triton={**common, "trunk_model": ENSEMBLE_MODEL}),
    }
    seconds, logits = _compare(variants, jobs, args.repeat)
    n = len(jobs)
    separate, shared = min(seconds["separate"]), min(seconds["shared_trunk"])
    return {
        "baseline_separate_models_images_per_s": round(n / separate, 3),
        "shared_trunk_ensemble_images_per_s": round(n / shared, 3),
        "ratio_vs_baseline": round(separate / shared, 2),
        "seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
        "max_abs_raw_logit_diff_vs_inprocess": {k: _worst(v, inprocess) for k, v in logits.items()},
        "server": server,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/trunk.json"))
    parser.add_argument("--images", type=int, default=16, help="Images per variant and round.")
    parser.add_argument("--batch-size", type=int, default=16, help="detectors.batch_size of both variants.")
    parser.add_argument("--repeat", type=int, default=2, help="Rounds; the best of each variant counts.")
    parser.add_argument("--runtime-variants", action="store_true",
                        help="Also the shared trunk at torch int8-mixed and on ONNX Runtime at fp32 and int8-mixed.")
    parser.add_argument("--triton", action="store_true", help="Also compare the two through a real tritonserver.")
    parser.add_argument("--triton-url", default=None, metavar="HOST:PORT",
                        help="With --triton: a running server instead of one started here, e.g. a GPU node serving "
                             "`triton build --device gpu --format onnx --shared-trunk` (the three detectors' models "
                             "and the ensemble loaded).")
    args = parser.parse_args()

    jobs = [ImageJob(f"img-{i}", photo_jpeg(SIZES[i % len(SIZES)], i)) for i in range(args.images)]
    variants: dict[str, Callable[[], Settings]] = {"separate": lambda: _settings(False, args.batch_size),
                                                   "shared_trunk": lambda: _settings(True, args.batch_size)}
    if args.runtime_variants:
        for name, backbone in RUNTIMES.items():
            variants[name] = lambda backbone=backbone: _settings(True, args.batch_size, backbone=backbone)
    load_before = os.getloadavg()[0]
    seconds, logits = _compare(variants, jobs, args.repeat)
    load_after = os.getloadavg()[0]

    n = len(jobs)
    separate, shared = min(seconds["separate"]), min(seconds["shared_trunk"])
    worst = _worst(logits["shared_trunk"], logits["separate"])
    result: dict[str, Any] = {
        "benchmark": "default_clip_detectors_shared_trunk_vs_separate",
        "detectors": list(DETECTORS),
        "images": n,
        "image_sizes": [f"{w}x{h}" for w, h in SIZES],
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "block_passes_per_image": {"separate": 36, "shared_trunk": 16},
        "baseline_separate_images_per_s": round(n / separate, 3),
        "shared_trunk_images_per_s": round(n / shared, 3),
        "ratio_vs_baseline": round(separate / shared, 2),
        "seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
        "max_abs_raw_logit_diff": worst,
    }
    print(f"in-process, separate models (baseline): {n / separate:7.3f} images/s")
    print(f"in-process, shared trunk              : {n / shared:7.3f} images/s  {separate / shared:.2f}x")
    print("  max |raw logit difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    if args.runtime_variants:
        runtimes = result["runtimes"] = _runtimes(n, seconds, logits)
        for name, row in runtimes.items():
            print(f"in-process, shared trunk, {name:<14}: {row['images_per_s']:7.3f} images/s  "
                  f"{row['ratio_vs_torch_fp32_shared_trunk']:.2f}x torch fp32 shared trunk")
            print("  max |raw logit - torch fp32|: " + ", ".join(
                f"{k} {v:.2e}" for k, v in row["max_abs_raw_logit_diff_vs_torch_fp32"].items()))
    if args.triton or args.triton_url:
        triton = result["triton"] = _triton(jobs, args, logits["separate"])
        print(f"triton, one model per detector (baseline): {triton['baseline_separate_models_images_per_s']:7.3f} "
              "images/s")
        print(f"triton, shared-trunk ensemble            : {triton['shared_trunk_ensemble_images_per_s']:7.3f} "
              f"images/s  {triton['ratio_vs_baseline']:.2f}x")
        for name, diff in triton["max_abs_raw_logit_diff_vs_inprocess"].items():
            print(f"  {name}: max |raw logit - in-process|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    result.update(machine.record(load_before))
    machine.write(args.out, result)
    print(f"load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs -> {args.out}")


if __name__ == "__main__":
    main()
