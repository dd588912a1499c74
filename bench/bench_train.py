"""Training-throughput benchmark for PiN-CLIP and MPFT: images/s of the trainer's own step.

Every variant builds a fresh backbone with adapters and runs `streamguard.training.trainer.train_step` on
batches from the trainer's `Feed` (so reading the prefix cache, or decoding and augmenting, is counted),
on the same synthetic JPEGs in the same run:

- ``cached``: the CPU recipe: the frozen blocks' output read from the prefix cache, LoRA on the last N.
- ``uncached``: the same step with the frozen blocks run at every step (the baseline for the cache).
- ``all``: LoRA on every block, full forward and backward (the GPU recipe; ``--with-all``, slow on a CPU).
- for MPFT also ``cached`` unmasked (mode ``none``): what Texture-Aware Masking saves.

It also times filling the prefix cache (read, augment, decode, frozen blocks, write) per image. One
warm-up step per variant is not counted.

    .venv/bin/python bench/bench_train.py [--backbone tiny|real] [--images 32] [--steps 3] [--batch-size 16]

With ``--backbone real`` (the cached ViT-B/16 from ``streamguard backbone fetch``) a round takes about
a minute and a half on an idle 2-core CPU; other work on the same cores slows it, so the JSON records the
load average. The tiny backbone (made here, random weights) checks the machinery in seconds; its steps are
so small that torch's thread start-up and any competing process dominate them (a step can take 20x longer
with 2 threads on a busy machine than with ``--threads 1``), so only the real backbone's ratios mean much.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import machine
from streamguard.backbone import ClipImageEncoder, load_backbone
from streamguard.backbone.lora import LoraConfig
from streamguard.builtin.cliphead import CONTRACT
from streamguard.config import BackboneSettings, IntakeSettings
from streamguard.evaluation.datasets import Sample, load_samples
from streamguard.training.data import Entry, Feed, augmentation_key
from streamguard.training.model import TunedClip, tuned_start
from streamguard.training.mpft import MpftConfig
from streamguard.training.pinclip import PinClipConfig
from streamguard.training.prefix_cache import PrefixCache
from streamguard.training.recipe import Recipe, build_objective
from streamguard.training.trainer import make_optimizer, train_step

SIZES = [(640, 480), (512, 512), (500, 375), (1024, 768)]
TINY = {"hidden_size": 64, "intermediate_size": 128, "projection_dim": 32, "num_hidden_layers": 6,
        "num_attention_heads": 2, "patch_size": 16, "image_size": 224, "hidden_act": "quick_gelu"}


@dataclass(frozen=True)
class Variant:
    method: str
    mode: str
    cached: bool
    tune_blocks: int | None

    @property
    def name(self) -> str:
        where = "all" if self.tune_blocks is None else ("cached" if self.cached else "uncached")
        return f"{self.method}/{self.mode}/{where}"


def _jpeg(size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 90.0 + seed), np.cos(y / 70.0), np.sin((x + y) / 150.0)], axis=-1) * 100 + 128
    img = np.clip(base + rng.normal(0, 8 if seed % 2 else 30, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_data(root: Path, images: int) -> list[Sample]:
    """``images`` synthetic JPEGs under ``root`` (odd ones in ``fake/``, even ones in ``real/``), read back."""
    for label in ("real", "fake"):
        (root / label).mkdir(parents=True)
    for i in range(images):
        label = "fake" if i % 2 else "real"
        (root / label / f"{i}.jpg").write_bytes(_jpeg(SIZES[i % len(SIZES)], i))
    return load_samples([root])


def _backbone(kind: str) -> ClipImageEncoder:
    if kind == "real":
        return load_backbone(BackboneSettings())
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)).eval()
    return ClipImageEncoder(model, weights_sha256="0" * 64, source="bench:tiny")


def _run(variant: Variant, kind: str, entries: list[Entry], cache_root: Path, args: argparse.Namespace) -> dict:
    encoder = _backbone(kind)
    start = tuned_start(encoder, variant.tune_blocks)
    model = TunedClip(encoder, start, LoraConfig(), seed=0)
    mode: Any = variant.mode
    recipe = Recipe(method=variant.method, data=(), out=Path("unused"),  # type: ignore[arg-type]
                    pinclip=PinClipConfig(mode=mode) if variant.method == "pin-clip" else PinClipConfig(),
                    mpft=MpftConfig(mode=mode) if variant.method == "mpft" else MpftConfig())
    objective = build_objective(recipe, encoder.embed_dim)
    cache = PrefixCache(cache_root, encoder.version, start, CONTRACT.size) if variant.cached else None
    optimizer = make_optimizer(model, objective, 1e-3, 1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    objective.module.train()
    with Feed(model, IntakeSettings(), cache, "cpu", args.batch_size) as feed:
        t0 = time.perf_counter()
        filled = sum(1 for e in entries if cache is not None and not cache.has(e.sample.id, e.augmentation))
        feed.warm(entries)
        fill_s = time.perf_counter() - t0
        batches = [entries[i : i + args.batch_size] for i in range(0, len(entries), args.batch_size)]
        batches = [b for b in batches if len(b) == args.batch_size]
        data_s = step_s = 0.0
        for step in range(args.steps + 1):
            t1 = time.perf_counter()
            batch = feed.batch(batches[step % len(batches)])
            t2 = time.perf_counter()
            train_step(model, objective, batch, optimizer, generator)
            t3 = time.perf_counter()
            if step:  # the first step is the warm-up
                data_s += t2 - t1
                step_s += t3 - t1
    images = args.steps * args.batch_size
    row = {
        "step_s": round(step_s / args.steps, 3),
        "images_per_s": round(images / step_s, 2),
        "data_share": round(data_s / step_s, 3),
        "tuned_blocks": int(encoder.config.num_hidden_layers) - start,
    }
    if filled:
        row["prefix_cache_fill_s_per_image"] = round(fill_s / filled, 3)
    print(f"{variant.name:<28} {row['images_per_s']:8.2f} images/s  {row['step_s']:7.3f} s/step "
          f"({row['data_share']:.0%} data)" + (f"  cache fill {row['prefix_cache_fill_s_per_image']:.3f} s/image"
                                              if filled else ""), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--images", type=int, default=32, help="Synthetic JPEGs (half 'real', half 'fake').")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per variant (after one warm-up).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tune-blocks", type=int, default=2)
    parser.add_argument("--with-all", action="store_true", help="Also time LoRA on every block (GPU recipe).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--out", type=Path, default=None, help="Default: bench/results/train-<backbone>.json")
    args = parser.parse_args()
    out = args.out or Path(f"bench/results/train-{args.backbone}.json")
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = [
        Variant("pin-clip", "learned", True, args.tune_blocks),
        Variant("pin-clip", "learned", False, args.tune_blocks),
        Variant("mpft", "texture", True, args.tune_blocks),
        Variant("mpft", "none", True, args.tune_blocks),
        Variant("mpft", "texture", False, args.tune_blocks),
    ]
    if args.with_all:
        variants += [Variant("pin-clip", "learned", False, None), Variant("mpft", "texture", False, None),
                     Variant("mpft", "none", False, None)]
    load_before = os.getloadavg()[0]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        entries = [Entry(s, augmentation_key(0, 0, True)) for s in write_data(root / "data", args.images)]
        for variant in variants:
            rows[variant.name] = _run(variant, args.backbone, entries, root / "cache", args)

    def ratio(a: str, b: str) -> float | None:
        return round(rows[a]["images_per_s"] / rows[b]["images_per_s"], 2) if a in rows and b in rows else None

    ratios = {
        "pin-clip cached vs uncached": ratio("pin-clip/learned/cached", "pin-clip/learned/uncached"),
        "mpft cached vs uncached": ratio("mpft/texture/cached", "mpft/texture/uncached"),
        "mpft masked vs unmasked (cached)": ratio("mpft/texture/cached", "mpft/none/cached"),
        "pin-clip cached vs all blocks": ratio("pin-clip/learned/cached", "pin-clip/learned/all"),
        "mpft masked vs unmasked (all blocks)": ratio("mpft/texture/all", "mpft/none/all"),
    }
    result = {
        "benchmark": "finetune_training_step",
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "tune_blocks": args.tune_blocks,
        "images": args.images,
        "variants": rows,
        "ratios": {k: v for k, v in ratios.items() if v is not None},
    }
    result.update(machine.record(load_before))
    machine.write(out, result)
    for name, value in result["ratios"].items():
        print(f"{name:<38} {value:.2f}x")
    print(f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs -> {out}")


if __name__ == "__main__":
    main()
