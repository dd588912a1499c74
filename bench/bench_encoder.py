"""Encoder precision benchmark: the CLIP ViT-B/16 encoder on the CPU at fp32 (the baseline) against
``backbone.precision = "int8"`` (dynamic int8 linear layers), and, where they run, bf16 autocast and
torch.compile; same images, same run. With ``--data``, the accuracy cost too.

    .venv/bin/python bench/bench_encoder.py [--images 16] [--batch-size 16] [--warmup 1] [--repeat 3]
        [--no-extra] [--data DIR ... --split test --limit 100] [--out bench/results/encoder.json]

Speed: the encoder's forward (pixels to embedding) on synthetic photos (bench/synthetic.py) prepared with
the detectors' input contract, in batches; after ``--warmup`` batches each, the variants alternate within
each of ``--repeat`` rounds and the best round of each counts, so a neighbour stealing the CPU for a while
biases none. Accuracy: the shipped univfd and mpft detectors built as they are served in-process
(`build_served`, adapters merged before quantizing) at fp32 and int8 score the same labelled images
(``--limit`` of ``--split``, a seeded choice); the largest and mean absolute difference of each detector's
calibrated probability, and ROC-AUC at each precision. Needs the real backbone (``streamguard backbone fetch``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthetic import photo_jpeg
from streamguard.backbone import ClipImageEncoder, load_backbone
from streamguard.builtin.cliphead import CONTRACT
from streamguard.builtin.cliphead.model import build_served
from streamguard.builtin.mpft.plugin import DETECTOR as MPFT
from streamguard.builtin.univfd.plugin import DETECTOR as UNIVFD
from streamguard.config import BackboneSettings, IntakeSettings, Settings
from streamguard.detectors.spec import Calibration
from streamguard.intake.contract import prepare
from streamguard.intake.decode import decode_image

SIZES = [(1280, 960), (640, 480), (512, 512), (1024, 768)]
Run = Callable[[torch.Tensor], torch.Tensor]


def _pixels(data: bytes, intake: IntakeSettings) -> np.ndarray:
    return prepare(decode_image(data, intake, CONTRACT.size), CONTRACT)


def _variants(extra: bool) -> tuple[dict[str, Run], dict[str, str]]:
    """The encoders to time, and why any that could not be set up was skipped."""
    fp32 = load_backbone(BackboneSettings(), precision="fp32")
    int8 = load_backbone(BackboneSettings(), precision="int8")
    runs: dict[str, Run] = {"fp32": fp32, "int8": int8}
    skipped: dict[str, str] = {}
    if not extra:
        return runs, {"bf16_autocast": "--no-extra", "compile": "--no-extra"}

    def bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fp32(x).float()

    runs["bf16_autocast"] = bf16
    try:
        runs["compile"] = torch.compile(fp32)  # compiled at its first call, in the warm-up
    except Exception as exc:  # noqa: BLE001 - any refusal is a reason to report, not a failure
        skipped["compile"] = f"{type(exc).__name__}: {exc}"[:300]
    return runs, skipped


def _forward(run: Run, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([run(batch) for batch in batches])


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    intake = IntakeSettings()
    images = np.stack([_pixels(photo_jpeg(SIZES[i % len(SIZES)], i), intake) for i in range(args.images)])
    batches = list(torch.from_numpy(images).split(args.batch_size))
    runs, skipped = _variants(not args.no_extra)
    outputs: dict[str, torch.Tensor] = {}
    warmup_s: dict[str, float] = {}
    for name in list(runs):
        start = time.perf_counter()
        try:
            for _ in range(args.warmup):
                _forward(runs[name], batches[:1])
        except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler for torch.compile, no bf16 kernels
            skipped[name] = f"{type(exc).__name__}: {exc}"[:300]
            del runs[name]
            continue
        warmup_s[name] = round(time.perf_counter() - start, 2)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = _forward(run, batches)
            seconds[name].append(time.perf_counter() - start)
    n = len(images)
    best = {name: min(s) for name, s in seconds.items()}
    reference = outputs["fp32"]
    return {
        "images": n,
        "batch_size": args.batch_size,
        "warmup_batches": args.warmup,
        "repeat": args.repeat,
        "images_per_s": {name: round(n / s, 3) for name, s in best.items()},
        "ratio_vs_fp32": {name: round(best["fp32"] / s, 2) for name, s in best.items()},
        "seconds": {name: [round(x, 2) for x in s] for name, s in seconds.items()},
        "warmup_seconds": warmup_s,
        "embedding_min_cosine_vs_fp32": {
            name: round(float(torch.nn.functional.cosine_similarity(out, reference, dim=-1).min()), 5)
            for name, out in outputs.items()},
        "skipped": skipped,
    }


def _labelled(args: argparse.Namespace) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, labels (1 = AI-generated) and prepared pixels of a seeded choice of ``--limit`` samples."""
    from streamguard.evaluation import load_samples
    from streamguard.evaluation.datasets import SampleReader

    samples = load_samples(args.data, seed=0, split=args.split)
    # Ranked by a hash of the id: the same choice every run, whatever order the files were listed in.
    samples = sorted(samples, key=lambda s: hashlib.sha256(s.id.encode()).hexdigest())[:args.limit]
    intake = IntakeSettings()
    ids, labels, pixels = [], [], []
    with SampleReader() as reader:
        for sample, data in reader.pairs(samples):
            try:
                pixels.append(_pixels(data, intake))
            except Exception:  # noqa: BLE001, S112 - an undecodable sample is skipped by both precisions alike
                continue
            ids.append(sample.id)
            labels.append(sample.label)
    return ids, np.asarray(labels), np.stack(pixels)


def _accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    ids, labels, pixels = _labelled(args)
    batches = list(torch.from_numpy(pixels).split(args.batch_size))
    settings = Settings()
    out: dict[str, Any] = {"data": [str(p) for p in args.data], "split": args.split, "images": len(ids),
                           "ai_generated": int(labels.sum())}
    for detector in (UNIVFD, MPFT):
        directory = detector.weights_dir(settings)
        calibration = Calibration.load(directory)
        probabilities: dict[str, np.ndarray] = {}
        aucs: dict[str, float] = {}
        for precision in ("fp32", "int8"):
            encoder: ClipImageEncoder = load_backbone(BackboneSettings(), precision="fp32")
            model = build_served(detector, encoder, directory, precision)
            logits = _forward(model, batches).numpy().astype(np.float64)
            probabilities[precision] = np.asarray(calibration.probability(logits))
            aucs[precision] = float(roc_auc_score(labels, logits)) if 0 < labels.sum() < len(labels) else float("nan")
            del model, encoder
        diff = np.abs(probabilities["int8"] - probabilities["fp32"])
        out[detector.name] = {
            "auc_fp32": round(aucs["fp32"], 4),
            "auc_int8": round(aucs["int8"], 4),
            "auc_loss": round(aucs["fp32"] - aucs["int8"], 4),
            "probability_max_abs_diff": round(float(diff.max()), 4),
            "probability_mean_abs_diff": round(float(diff.mean()), 5),
            "decision_flips_at_0.5": int(((probabilities["int8"] >= 0.5) != (probabilities["fp32"] >= 0.5)).sum()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/encoder.json"))
    parser.add_argument("--images", type=int, default=16, help="Synthetic images per variant and round.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="Warm-up batches per variant (compiles torch.compile).")
    parser.add_argument("--repeat", type=int, default=3, help="Rounds; the best of each variant counts.")
    parser.add_argument("--no-extra", action="store_true", help="Time fp32 and int8 only (no bf16, no compile).")
    parser.add_argument("--data", type=Path, action="append", default=[], help="Labelled data (repeatable).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=100, help="Labelled images scored at each precision.")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {"benchmark": "clip_b16_encoder_precision_cpu", "speed": _speed(args)}
    speed = result["speed"]
    for name, rate in speed["images_per_s"].items():
        print(f"encoder {name:14s}: {rate:7.3f} images/s  {speed['ratio_vs_fp32'][name]:.2f}x  "
              f"(min cosine vs fp32 {speed['embedding_min_cosine_vs_fp32'][name]})")
    for name, why in speed["skipped"].items():
        print(f"encoder {name:14s}: skipped ({why})")
    if args.data:
        accuracy = result["accuracy"] = _accuracy(args)
        print(f"accuracy on {accuracy['images']} images of {args.split} ({accuracy['ai_generated']} AI-generated):")
        for name in (UNIVFD.name, MPFT.name):
            a = accuracy[name]
            print(f"  {name}: AUC fp32 {a['auc_fp32']:.4f} int8 {a['auc_int8']:.4f} (loss {a['auc_loss']:+.4f}); "
                  f"|p int8 - p fp32| max {a['probability_max_abs_diff']:.4f} mean {a['probability_mean_abs_diff']:.5f}")
    result.update({
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "quantized_engine": torch.backends.quantized.engine,
        # Other processes on the same cores slow torch far more than proportionally: the load is recorded.
        "load_average_before_end": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
