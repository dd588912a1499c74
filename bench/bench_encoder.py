"""Encoder speed benchmark: the CLIP ViT-B/16 encoder on the CPU at fp32 (the baseline) against the faster
variants, same images, same run; with ``--data``, the accuracy cost of each too.

    .venv/bin/python bench/bench_encoder.py [--variants fp32,int8,int8-mixed,ort-fp32,ort-int8-mixed]
        [--images 16] [--batch-size 16] [--warmup 1] [--repeat 3] [--speed-only | --accuracy-only]
        [--data DIR ... --split test --limit 100] [--out bench/results/encoder.json]

Variants: ``fp32``, ``int8`` and ``int8-mixed`` are torch at that ``backbone.precision``
(`streamguard.backbone.precision`); ``int8-mixed-smooth`` is int8-mixed after SmoothQuant-style scaling of the
layernorm-fed layers (`_smooth_layernorms`, scales from 8 synthetic photos; measured here only); ``ort-fp32``, ``ort-int8`` and ``ort-int8-mixed`` the same encoder run by
ONNX Runtime (`streamguard.backbone.onnx_runtime`: the fp32 graph, or ORT's dynamic int8 of it with the layers
that precision keeps float left out; graphs cached under ``--ort-cache``); ``bf16_autocast`` and ``compile``
(torch.compile) only when named.

Speed: the encoder's forward (pixels to embedding) on synthetic photos (bench/synthetic.py) prepared with
the detectors' input contract, in batches; after ``--warmup`` batches each, the variants alternate within
each of ``--repeat`` rounds and the best round of each counts, so a neighbour stealing the CPU for a while
biases none. Accuracy: the shipped univfd and mpft detectors built as they are served in-process
(`build_served`, adapters merged before quantizing or exporting) score the same labelled images (``--limit``
of ``--split``, a seeded choice) with each variant; per variant, ROC-AUC and its loss against fp32, and the
largest and mean absolute difference of each detector's calibrated probability from fp32's. Needs the real
backbone (``streamguard backbone fetch``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import machine
from synthetic import photo_jpeg
from streamguard.backbone import ClipImageEncoder, load_backbone
from streamguard.backbone.onnx_runtime import OrtEncoder
from streamguard.backbone.precision import PRECISIONS
from streamguard.builtin.cliphead import CONTRACT
from streamguard.builtin.cliphead.model import ClassTokenModel, build_served
from streamguard.builtin.mpft.plugin import DETECTOR as MPFT
from streamguard.builtin.univfd.plugin import DETECTOR as UNIVFD
from streamguard.config import BackboneSettings, IntakeSettings, Settings
from streamguard.detectors.spec import Calibration
from streamguard.intake.contract import prepare
from streamguard.intake.decode import decode_image

SIZES = [(1280, 960), (640, 480), (512, 512), (1024, 768)]
Run = Callable[[torch.Tensor], torch.Tensor]
ORT = {"ort-fp32": None, "ort-int8": "int8", "ort-int8-mixed": "int8-mixed"}
SMOOTH = "int8-mixed-smooth"
EXTRA = ("bf16_autocast", "compile")
DEFAULT_VARIANTS = "fp32,int8,int8-mixed,int8-mixed-smooth,ort-fp32,ort-int8-mixed"


def _pixels(data: bytes, intake: IntakeSettings) -> np.ndarray:
    return prepare(decode_image(data, intake, CONTRACT.size), CONTRACT)


def _smooth_layernorms(encoder: ClipImageEncoder, alpha: float = 0.5, images: int = 8) -> ClipImageEncoder:
    """SmoothQuant-style, in place and exact in float: each block's q/k/v and fc1 inputs (layernorm outputs)
    divided per channel by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (folded into the layernorm's weight
    and bias) and those layers' weight columns multiplied by it, ``max|X_j|`` from ``images`` synthetic photos
    (seeds apart from the timed ones). Moves the layernorm outputs' outlier channels into the int8 weights."""
    intake = IntakeSettings()
    calibration = torch.from_numpy(np.stack([_pixels(photo_jpeg(SIZES[i % len(SIZES)], 1000 + i), intake)
                                             for i in range(images)]))
    layers = encoder.model.vision_model.encoder.layers
    absmax: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(layers):
        for norm in ("layer_norm1", "layer_norm2"):
            def hook(_m: torch.nn.Module, _i: object, out: torch.Tensor, key: tuple[int, str] = (i, norm)) -> None:
                absmax[key] = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
            hooks.append(getattr(block, norm).register_forward_hook(hook))
    with torch.inference_mode():
        encoder(calibration)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, block in enumerate(layers):
            attention = block.self_attn
            for norm, linears in (("layer_norm1", [attention.q_proj, attention.k_proj, attention.v_proj]),
                                  ("layer_norm2", [block.mlp.fc1])):
                w = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0).clamp(min=1e-5)
                s = (absmax[(i, norm)].clamp(min=1e-5) ** alpha / w ** (1 - alpha)).clamp(min=1e-5)
                getattr(block, norm).weight.div_(s)
                getattr(block, norm).bias.div_(s)
                for lin in linears:
                    lin.weight.mul_(s)
    return encoder


def _encoder(variant: str, ort_cache: Path, fp32: ClipImageEncoder | None = None) -> Run:
    """The encoder forward of ``variant`` (pixels -> embedding); ``fp32``, when given, is the float encoder
    to convert or export (adapters already merged), else the backbone is loaded."""
    if variant in PRECISIONS:
        if fp32 is None:
            return load_backbone(BackboneSettings(), precision=variant)  # type: ignore[arg-type]
        from streamguard.backbone.precision import quantize_encoder
        return quantize_encoder(fp32, variant)
    fp32 = fp32 if fp32 is not None else load_backbone(BackboneSettings(), precision="fp32")
    if variant == SMOOTH:  # a measured variant only: its scales come from calibration images
        from streamguard.backbone.precision import quantize_encoder
        return quantize_encoder(_smooth_layernorms(fp32), "int8-mixed")
    if variant in ORT:
        return OrtEncoder(fp32, ort_cache, quantize=ORT[variant])
    if variant == "bf16_autocast":
        def bf16(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fp32(x).float()
        return bf16
    if variant == "compile":
        return torch.compile(fp32)  # compiled at its first call, in the warm-up
    raise SystemExit(f"unknown variant {variant!r}: {', '.join([*PRECISIONS, SMOOTH, *ORT, *EXTRA])}")


def _variants(names: Sequence[str], ort_cache: Path) -> tuple[dict[str, Run], dict[str, str]]:
    """The encoders to time, and why any that could not be set up was skipped."""
    runs: dict[str, Run] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            runs[name] = _encoder(name, ort_cache)
        except Exception as exc:  # noqa: BLE001 - any refusal is a reason to report, not a failure
            skipped[name] = f"{type(exc).__name__}: {exc}"[:300]
    return runs, skipped


def _forward(run: Run, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([run(batch) for batch in batches])


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    intake = IntakeSettings()
    images = np.stack([_pixels(photo_jpeg(SIZES[i % len(SIZES)], i), intake) for i in range(args.images)])
    batches = list(torch.from_numpy(images).split(args.batch_size))
    runs, skipped = _variants(args.variants, args.ort_cache)
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
    variants = [v for v in args.variants if v not in EXTRA]
    out: dict[str, Any] = {"data": [str(p) for p in args.data], "split": args.split, "images": len(ids),
                           "ai_generated": int(labels.sum()), "variants": variants}
    both = 0 < labels.sum() < len(labels)
    for detector in (UNIVFD, MPFT):
        directory = detector.weights_dir(settings)
        calibration = Calibration.load(directory)
        probabilities: dict[str, np.ndarray] = {}
        aucs: dict[str, float] = {}
        for variant in variants:
            encoder: ClipImageEncoder = load_backbone(BackboneSettings(), precision="fp32")
            model = build_served(detector, encoder, directory)  # adapters merged, still float
            if isinstance(model, ClassTokenModel):
                # Its head reads every block, not the embedding these variants compute: only the in-place
                # precisions apply (ONNX Runtime serves it on the shared trunk, `train loso-variants`).
                if variant not in PRECISIONS:
                    continue
                run = _encoder(variant, args.ort_cache, model.encoder)
                logits = _forward(model, batches).numpy().astype(np.float64)
            else:
                run = _encoder(variant, args.ort_cache, model.encoder)
                probe = model.probe
                logits = _forward(lambda x, run=run, probe=probe: probe(run(x)), batches).numpy().astype(np.float64)
            probabilities[variant] = np.asarray(calibration.probability(logits))
            aucs[variant] = float(roc_auc_score(labels, logits)) if both else float("nan")
            del model, encoder, run
        reference = probabilities.get("fp32")
        result: dict[str, Any] = {}
        for variant in variants:
            if variant not in aucs:
                result[variant] = {"skipped": "a class-token head: served on the shared trunk, not this encoder"}
                continue
            row: dict[str, Any] = {"auc": round(aucs[variant], 4)}
            if reference is not None:
                diff = np.abs(probabilities[variant] - reference)
                row.update({
                    "auc_loss": round(aucs["fp32"] - aucs[variant], 4),
                    "probability_max_abs_diff": round(float(diff.max()), 4),
                    "probability_mean_abs_diff": round(float(diff.mean()), 5),
                    "decision_flips_at_0.5": int(((probabilities[variant] >= 0.5) != (reference >= 0.5)).sum()),
                })
            result[variant] = row
        out[detector.name] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/encoder.json"))
    parser.add_argument("--images", type=int, default=16, help="Synthetic images per variant and round.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="Warm-up batches per variant (compiles torch.compile).")
    parser.add_argument("--repeat", type=int, default=3, help="Rounds; the best of each variant counts.")
    parser.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x], default=DEFAULT_VARIANTS,
                        help=f"Comma-separated, fp32 first (the reference): {', '.join([*PRECISIONS, SMOOTH, *ORT, *EXTRA])}.")
    parser.add_argument("--ort-cache", type=Path, default=BackboneSettings().cache_dir / "onnx-encoder",
                        help="Where the ONNX graphs are exported once (keyed by the weights).")
    parser.add_argument("--speed-only", action="store_true", help="Skip the accuracy part even with --data.")
    parser.add_argument("--accuracy-only", action="store_true", help="Skip the speed part.")
    parser.add_argument("--data", type=Path, action="append", default=[], help="Labelled data (repeatable).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=100, help="Labelled images scored at each precision.")
    args = parser.parse_args()

    if isinstance(args.variants, str):
        args.variants = args.variants.split(",")
    if args.variants[0] != "fp32":
        args.variants = ["fp32", *[v for v in args.variants if v != "fp32"]]
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {"benchmark": "clip_b16_encoder_variants_cpu"}
    if not args.accuracy_only:
        speed = result["speed"] = _speed(args)
        for name, rate in speed["images_per_s"].items():
            print(f"encoder {name:14s}: {rate:7.3f} images/s  {speed['ratio_vs_fp32'][name]:.2f}x  "
                  f"(min cosine vs fp32 {speed['embedding_min_cosine_vs_fp32'][name]})")
        for name, why in speed["skipped"].items():
            print(f"encoder {name:14s}: skipped ({why})")
    if args.data and not args.speed_only:
        accuracy = result["accuracy"] = _accuracy(args)
        print(f"accuracy on {accuracy['images']} images of {args.split} ({accuracy['ai_generated']} AI-generated):")
        for name in (UNIVFD.name, MPFT.name):
            for variant, a in accuracy[name].items():
                print(f"  {name:6s} {variant:14s}: AUC {a['auc']:.4f} (loss {a.get('auc_loss', float('nan')):+.4f}); "
                      f"|p - p fp32| max {a.get('probability_max_abs_diff', float('nan')):.4f} "
                      f"mean {a.get('probability_mean_abs_diff', float('nan')):.5f}")
    result.update({
        "quantized_engine": torch.backends.quantized.engine,
    })
    result.update(machine.record(load_before))
    machine.write(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
