"""NIRNet against the shipped CLIP detectors in the same run: inference images/s and training images/s.

    .venv/bin/python bench/bench_nirnet.py [--nirnet-weights DIR] [--images 16] [--repeat 2] [--steps 3]
        [--batch-size 8] [--branches noise,frequency] [--no-simulator] [--backbone tiny|real]
        [--skip-inference] [--skip-training] [--out bench/results/nirnet.json]

Inference: three real `Scorer`s (the worker's detection path), one detector each: ``univfd`` (the baseline),
``mpft`` and ``nirnet`` (weights from ``--nirnet-weights``, default the plugin's ``weights/``). Each decodes
the same synthetic photos once beforehand (each at its own decode size: NIRNet's native crops want full
resolution), then is timed on `Scorer.judge`; the scorers alternate within each of ``--repeat`` rounds and
the best round of each counts, so a neighbouring process stealing CPU for a while biases none. The ratio
is a detector's images/s over univfd's: above 1 is faster than univfd. A NIRNet with its semantic branch
runs a CLIP pass of its own per image (recorded as ``semantic_branch``). Needs the real backbone.

Training: images/s of NIRNet's own step (`streamguard.training.nirnet.train.train_step` on batches from the
trainer's `make_batch`, which decodes, crops, imprints and re-encodes: counted, as in a real epoch) against
the CLIP trainers' step (`bench_train._run`: MPFT with Texture-Aware Masking and PiN-CLIP, both on the
prefix cache with LoRA on the last 2 blocks), on the same synthetic JPEGs. An image counts once whatever it
brings: NIRNet's ``crops`` crops per image (and their simulated fakes) are recorded beside it. The simulator's
imprints are fitted on the synthetic fakes first, and semantic-branch embeddings computed first, as the
trainer does once per run; neither is timed. One warm-up step per variant is not counted. The ratio is
NIRNet's images/s over each CLIP trainer's. ``--backbone tiny`` (random weights) checks the machinery in
seconds; only ``real`` numbers mean much. The JSON records the load average: other work on the same cores
slows torch far more than proportionally.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import machine
from bench_train import Variant, _backbone, _run, write_data
from bench_trunk import SIZES
from synthetic import photo_jpeg
from streamguard.builtin.nirnet.backend import semantic_contract
from streamguard.builtin.nirnet.files import BRANCHES, has_weights, read_config, version
from streamguard.builtin.nirnet.model import NIRNet
from streamguard.builtin.nirnet.plugin import WEIGHTS_DIR
from streamguard.config import IntakeSettings, Settings, load_settings
from streamguard.evaluation.datasets import Sample
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Outcome, Scorer
from streamguard.training.data import Entry, augmentation_key
from streamguard.training.nirnet.imprint import ImprintSimulator
from streamguard.training.nirnet.recipe import NirnetRecipe
from streamguard.training.nirnet.train import Inputs, fit_imprints, make_batch, train_step

BASELINE = "univfd"
PLUGINS = {"univfd": "builtin-univfd", "mpft": "builtin-mpft", "nirnet": "builtin-nirnet"}
CLIP_TRAINERS = (Variant("mpft", "texture", True, 2), Variant("pin-clip", "learned", True, 2))


# --- inference ---------------------------------------------------------------------------------------------


def _settings(detector: str, weights: Path) -> Settings:
    return load_settings(plugins={"allow": ["builtin-fusion", "builtin-policy", PLUGINS[detector]], "deny": []},
                         detectors={"timeout_s": None, "options": {"nirnet": {"weights_dir": str(weights)}}})


def _judge(scorer: Scorer, decoded: list[Outcome]) -> float:
    for outcome in decoded:
        outcome.verdict = None
    start = time.perf_counter()
    scorer.judge(decoded)
    seconds = time.perf_counter() - start
    for outcome in decoded:
        assert outcome.verdict is not None
        for score in outcome.verdict.scores:
            if score.error is not None or score.raw_logit is None:
                raise RuntimeError(f"{score.detector} failed: {score.error}")
    return seconds


def _time_scorers(jobs: list[ImageJob], weights: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds per round of each detector's scorer, the scorers alternating within each round."""
    scorers: dict[str, Scorer] = {}
    decoded: dict[str, list[Outcome]] = {}
    try:
        for detector in PLUGINS:
            settings = _settings(detector, weights)
            scorer = scorers[detector] = Scorer(settings, build_plugin_manager(settings.plugins)).start()
            loaded = [runner.spec.name for runner in scorer.runners if runner.load_error is None]
            if loaded != [detector]:
                errors = {runner.spec.name: runner.load_error for runner in scorer.runners}
                raise SystemExit(f"{detector} did not load (registered and errors: {errors})")
            decoded[detector] = scorer.decode(jobs)
            _judge(scorer, decoded[detector][:2])  # warm-up: first-call allocations, kernel selection, threads
        seconds: dict[str, list[float]] = {detector: [] for detector in PLUGINS}
        for _ in range(repeat):
            for detector in PLUGINS:
                seconds[detector].append(_judge(scorers[detector], decoded[detector]))
    finally:
        for scorer in scorers.values():
            scorer.close()
    return seconds


def _inference(args: argparse.Namespace) -> dict[str, Any]:
    config = read_config(args.nirnet_weights)
    jobs = [ImageJob(f"img-{i}", photo_jpeg(SIZES[i % len(SIZES)], i)) for i in range(args.images)]
    seconds = _time_scorers(jobs, args.nirnet_weights, args.repeat)
    best = {detector: min(rounds) for detector, rounds in seconds.items()}
    rows = {detector: {"images_per_s": round(len(jobs) / best[detector], 3),
                       "ratio_vs_univfd": round(best[BASELINE] / best[detector], 2),
                       "seconds": [round(s, 2) for s in seconds[detector]]} for detector in PLUGINS}
    for detector, row in rows.items():
        print(f"inference {detector:<8} {row['images_per_s']:8.3f} images/s  {row['ratio_vs_univfd']:.2f}x univfd",
              flush=True)
    print(f"  nirnet semantic branch {'on: it runs a CLIP pass of its own' if config.semantic else 'off'}")
    return {
        "images": len(jobs),
        "image_sizes": [f"{w}x{h}" for w, h in SIZES],
        "batch_size": _settings(BASELINE, args.nirnet_weights).detectors.batch_size,
        "baseline": BASELINE,
        "detectors": rows,
        "nirnet": {"weights_dir": str(args.nirnet_weights), "version": version("nirnet", args.nirnet_weights),
                   "branches": list(config.branches), "semantic_branch": config.semantic,
                   "crop_size": config.crop_size, "crops": config.crops},
    }


# --- training ----------------------------------------------------------------------------------------------


def _ignore(*_: object, **__: object) -> None:
    return None


def _nirnet_model(recipe: NirnetRecipe, backbone: str) -> tuple[NIRNet, Inputs]:
    """A fresh NIRNet and its inputs; with the semantic branch, ``backbone``'s CLIP encoder embeds them."""
    encoder = _backbone(backbone) if recipe.semantic else None
    if encoder is None:
        return NIRNet(recipe.model_config()), Inputs(IntakeSettings(), None, None, "cpu")
    model = NIRNet(recipe.model_config(encoder.embed_dim, encoder.version))
    return model, Inputs(IntakeSettings(), encoder, semantic_contract(encoder), "cpu")


def _nirnet_training(samples: list[Sample], args: argparse.Namespace) -> dict[str, Any]:
    recipe = NirnetRecipe(data=(), batch_size=args.batch_size, branches=args.branches,
                          simulator=not args.no_simulator)
    imprints = fit_imprints(recipe, samples, IntakeSettings())[0] if recipe.simulator else {}
    simulator = ImprintSimulator(imprints, seed=recipe.seed) if imprints else None
    torch.manual_seed(0)
    model, inputs = _nirnet_model(recipe, args.backbone)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    try:
        usable = inputs.warm(samples, _ignore)
        batches = [usable[i : i + args.batch_size] for i in range(0, len(usable), args.batch_size)]
        batches = [b for b in batches if len(b) == args.batch_size]
        data_s = step_s = 0.0
        crops = simulated = 0
        for step in range(args.steps + 1):
            t1 = time.perf_counter()
            batch = make_batch(batches[step % len(batches)], inputs, recipe, simulator, 1, step)
            t2 = time.perf_counter()
            train_step(model, optimizer, batch, "cpu")
            t3 = time.perf_counter()
            if step:  # the first step is the warm-up
                data_s += t2 - t1
                step_s += t3 - t1
                crops += len(batch.labels)
                simulated += batch.simulated
    finally:
        inputs.close()
    row = {
        "step_s": round(step_s / args.steps, 3),
        "images_per_s": round(args.steps * args.batch_size / step_s, 2),
        "data_share": round(data_s / step_s, 3),
        "branches": list(recipe.branches),
        "crop_size": recipe.crop_size,
        "crops_per_image": recipe.crops,
        "simulator": recipe.simulator,
        "crops_per_step": round(crops / args.steps, 1),
        "simulated_crops_per_step": round(simulated / args.steps, 1),
    }
    print(f"{'nirnet':<28} {row['images_per_s']:8.2f} images/s  {row['step_s']:7.3f} s/step "
          f"({row['data_share']:.0%} data, {row['crops_per_step']:g} crops/step)", flush=True)
    return row


def _training(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-nirnet-") as tmp:
        root = Path(tmp)
        samples = write_data(root / "data", args.images)
        rows = {"nirnet": _nirnet_training(samples, args)}
        entries = [Entry(s, augmentation_key(0, 0, True)) for s in samples]
        for variant in CLIP_TRAINERS:
            rows[variant.name] = _run(variant, args.backbone, entries, root / "cache", args)
    ratios = {name: round(rows["nirnet"]["images_per_s"] / row["images_per_s"], 2)
              for name, row in rows.items() if name != "nirnet"}
    for name, ratio in ratios.items():
        print(f"training nirnet vs {name:<24} {ratio:.2f}x")
    return {"backbone": args.backbone, "batch_size": args.batch_size, "steps": args.steps, "images": args.images,
            "variants": rows, "nirnet_ratio_vs": ratios}


# --- run ---------------------------------------------------------------------------------------------------


def _branches(value: str) -> tuple[str, ...]:
    names = tuple(b.strip() for b in value.split(",") if b.strip())
    if not names or any(b not in BRANCHES for b in names):
        raise argparse.ArgumentTypeError(f"{value!r}: a comma-separated subset of {','.join(BRANCHES)}")
    return names


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/nirnet.json"))
    parser.add_argument("--nirnet-weights", type=Path, default=WEIGHTS_DIR, help="NIRNet weights directory.")
    parser.add_argument("--images", type=int, default=16, help="Synthetic images for inference and for training.")
    parser.add_argument("--repeat", type=int, default=2, help="Inference rounds; the best of each detector counts.")
    parser.add_argument("--steps", type=int, default=3, help="Timed training steps per variant (after one warm-up).")
    parser.add_argument("--batch-size", type=int, default=8, help="Training images per step (NIRNet's default).")
    parser.add_argument("--branches", type=_branches, default=("noise", "frequency"),
                        help="NIRNet's training branches; semantic embeds with --backbone.")
    parser.add_argument("--no-simulator", action="store_true", help="Train NIRNet without simulated imprints.")
    parser.add_argument("--backbone", choices=("tiny", "real"), default="real",
                        help="CLIP of the training part (inference always uses the real one).")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    if args.skip_inference and args.skip_training:
        parser.error("nothing to run: both parts skipped")
    if not args.skip_inference and not has_weights(args.nirnet_weights):
        parser.error(f"no NIRNet weights in {args.nirnet_weights}: train them (`streamguard train nirnet --out "
                     "DIR`) and pass --nirnet-weights DIR, or --skip-inference")
    if not args.skip_training and args.images < max(args.batch_size, 2):
        parser.error(f"training needs --images of at least --batch-size ({args.batch_size}) and 2 (a real one "
                     "and a generated one)")
    return args


def main() -> None:
    args = _arguments()
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {"benchmark": "nirnet_vs_clip_detectors"}
    if not args.skip_inference:
        result["inference"] = _inference(args)
    if not args.skip_training:
        result["training"] = _training(args)
    result.update(machine.record(load_before))
    machine.write(args.out, result)
    print(f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs -> {args.out}")


if __name__ == "__main__":
    main()
