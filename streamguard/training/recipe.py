"""A training run from start to end: the recipe (configuration), then data, model, loop, calibration,
report and the detector's files.

CPU defaults: the last 2 blocks tuned with rank-8 LoRA on q and v, the frozen prefix cached, batches of 16,
two augmentation variants per image. ``tune_blocks=None`` (``--tune-blocks all``) adapts every block and
caches only the token embeddings (the GPU recipe; MPFT then masks at the input, as in the paper).
Temperature scaling is fitted on validation after training; test (or the held-out groups) is only reported.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from streamguard.backbone import load_backbone, vit
from streamguard.backbone.lora import LoraConfig
from streamguard.builtin.cliphead import CONTRACT, TRAINING_FILE, builtin_detectors
from streamguard.config import Settings
from streamguard.detectors.calibration import Calibration
from streamguard.evaluation.datasets import Sample
from streamguard.training.artifacts import save_detector
from streamguard.training.data import (NO_AUGMENTATION, Entry, Feed, Splits, augmentation_key, is_held_out,
                                       split_samples)
from streamguard.training.held_out import HELD_OUT_FILE, held_out_scores, save_held_out
from streamguard.training.model import TunedClip, tuned_start
from streamguard.training.mpft import MpftConfig, MpftObjective
from streamguard.training.objective import Objective
from streamguard.training.pinclip import PinClipConfig, PinClipObjective
from streamguard.training.prefix_cache import PrefixCache
from streamguard.training.renders import RENDER_VERSION, rendered_samples
from streamguard.training.trainer import Bars, LoopConfig, fit, predict
from streamguard.training.twins import asked_twins, twin_files, twin_settings

log = structlog.get_logger(__name__)

Method = Literal["pin-clip", "mpft"]
METHODS: tuple[Method, ...] = ("pin-clip", "mpft")


@dataclass(frozen=True)
class Recipe:
    method: Method
    data: tuple[str, ...]
    out: Path
    seed: int = 0
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    head_lr: float | None = None  # None: 10 x lr
    weight_decay: float = 1e-4
    patience: int = 3
    tune_blocks: int | None = 2  # None: every block
    lora: LoraConfig = field(default_factory=LoraConfig)
    limit_per_group: int | None = None
    holdout_generators: tuple[str, ...] = ()
    holdout_sources: tuple[str, ...] = ()
    augment: bool = True
    augment_variants: int = 2
    prefix_cache: bool = True
    device: str = "cpu"
    cache_dir: Path = Path(".cache/train")
    checkpoint_dir: Path | None = None  # default: under cache_dir, per method and output folder
    resume: bool = False
    progress: bool = False
    pinclip: PinClipConfig = field(default_factory=PinClipConfig)
    mpft: MpftConfig = field(default_factory=MpftConfig)
    # The real class also holds this many procedural screenshots (`renders.rendered_samples`) and this many
    # real training photos shown as a post in a feed's screenshot (`renders.FeedPost`), as univfd's probe does.
    rendered_screens: int = 0
    feed_twins: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if min(self.epochs, self.batch_size, self.patience, self.augment_variants) < 1:
            raise ValueError("epochs, batch_size, patience and augment_variants must be at least 1")
        if self.rendered_screens < 0:
            raise ValueError(f"rendered_screens must be 0 or more, not {self.rendered_screens}")
        asked_twins(feed=self.feed_twins)  # refuses < 0

    def splits(self, samples: Sequence[Sample]) -> Splits:
        """The data's splits under the recipe's hold-outs, the renders and twins asked for in train: the held-out
        and test images are the data's alone."""
        splits = split_samples(samples, self.holdout_generators, self.holdout_sources)
        return replace(splits, train=splits.train + self.extra_training(samples))

    def extra_training(self, samples: Sequence[Sample]) -> list[Sample]:
        """The rendered screenshots and feed twins asked for, as training samples. A twin is of its photo's
        group and leaves with it: never a held-out image itself, whose scores are the data's images only. A
        render is of a source no fold holds out."""
        renders = rendered_samples(self.rendered_screens, self.seed, self.cache_dir) if self.rendered_screens else []
        twins = twin_files(asked_twins(feed=self.feed_twins), samples, self.seed, self.cache_dir)
        return [s for s in renders + twins if not is_held_out(s, self.holdout_generators, self.holdout_sources)]

    @property
    def resolved_head_lr(self) -> float:
        return self.head_lr if self.head_lr is not None else 10 * self.lr

    @property
    def mode(self) -> str:
        return self.pinclip.mode if self.method == "pin-clip" else self.mpft.mode

    def method_config(self) -> dict[str, Any]:
        return asdict(self.pinclip) if self.method == "pin-clip" else asdict(self.mpft)

    def fingerprint(self) -> dict[str, Any]:
        """What defines the trained weights: a checkpoint resumes only under the same fingerprint.

        Left out: the epoch budget (resuming to train longer is the point), where files go, the device and
        whether bars are drawn.
        """
        return json.loads(json.dumps({
            "method": self.method, "data": list(self.data), "seed": self.seed, "batch_size": self.batch_size,
            "lr": self.lr, "head_lr": self.resolved_head_lr, "weight_decay": self.weight_decay,
            "patience": self.patience,
            "tune_blocks": self.tune_blocks, "lora": asdict(self.lora), "limit_per_group": self.limit_per_group,
            "holdout_generators": list(self.holdout_generators), "holdout_sources": list(self.holdout_sources),
            "augment": self.augment, "augment_variants": self.augment_variants, "prefix_cache": self.prefix_cache,
            "config": self.method_config(),
            # Only when asked, so that checkpoints of recipes from before them still resume.
            **({"rendered_screens": [self.rendered_screens, RENDER_VERSION]} if self.rendered_screens else {}),
            **twin_settings(asked_twins(feed=self.feed_twins)),
        }, default=str))

    def resolved_checkpoint_dir(self) -> Path:
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        key = hashlib.sha256(str(self.out.resolve()).encode()).hexdigest()[:10]
        return self.cache_dir / "checkpoints" / f"{self.method}-{key}"

    def command(self) -> str:
        """The ``streamguard train`` command line that reproduces this recipe's weights."""
        args = ["streamguard", "train", self.method]
        for root in self.data:
            args += ["--data", root]
        args += ["--seed", str(self.seed), "--epochs", str(self.epochs), "--batch-size", str(self.batch_size),
                 "--lr", repr(self.lr), "--head-lr", repr(self.resolved_head_lr), "--patience", str(self.patience),
                 "--tune-blocks", "all" if self.tune_blocks is None else str(self.tune_blocks),
                 "--lora-rank", str(self.lora.rank), "--lora-targets", ",".join(self.lora.targets),
                 "--mode", self.mode, "--augment-variants", str(self.augment_variants)]
        if self.method == "pin-clip":
            args += ["--beta", repr(self.pinclip.beta)]
            if self.pinclip.class_embeddings is not None:
                args += ["--class-embeddings", str(self.pinclip.class_embeddings)]
        else:
            args += ["--rho-min", repr(self.mpft.rho_min), "--rho-max", repr(self.mpft.rho_max)]
        if self.limit_per_group is not None:
            args += ["--limit-per-group", str(self.limit_per_group)]
        for generator in self.holdout_generators:
            args += ["--holdout-generator", generator]
        for source in self.holdout_sources:
            args += ["--holdout-source", source]
        if self.rendered_screens:
            args += ["--rendered-screens", str(self.rendered_screens)]
        if self.feed_twins:
            args += ["--feed-twins", str(self.feed_twins)]
        if not self.augment:
            args.append("--no-augment")
        if not self.prefix_cache:
            args.append("--no-prefix-cache")
        return shlex.join(args)


def build_objective(recipe: Recipe, embed_dim: int) -> Objective:
    if recipe.method == "pin-clip":
        return PinClipObjective(recipe.pinclip, embed_dim, recipe.seed + 2)
    return MpftObjective(recipe.mpft)


def _check_splits(splits: Splits) -> None:
    for name in ("train", "val"):
        labels = {s.label for s in getattr(splits, name)}
        if labels != {0, 1}:
            raise ValueError(f"training needs real and generated images in the {name} split, found labels "
                             f"{sorted(labels)} in {len(getattr(splits, name))} samples")


def _grouped(entries: list[Entry], logits: np.ndarray, calibration: Calibration) -> dict[str, Any]:
    from streamguard.evaluation.metrics import grouped_metrics

    scores = calibration.probability(logits).tolist()
    samples = [e.sample for e in entries]
    return grouped_metrics([s.label for s in samples], [s.generator for s in samples],
                           [s.source for s in samples], scores).as_dict()


def train_detector(settings: Settings, recipe: Recipe) -> dict[str, Any]:
    """Train, calibrate and write the detector to ``recipe.out``; returns the report (``training.json``)."""
    from streamguard.evaluation import load_samples
    from streamguard.evaluation.calibrate import fit_calibration, quality

    started = time.perf_counter()
    samples = load_samples(recipe.data, seed=recipe.seed, limit_per_group=recipe.limit_per_group)
    splits = recipe.splits(samples)
    _check_splits(splits)
    encoder = load_backbone(settings.backbone, recipe.device, precision="fp32")
    start = tuned_start(encoder, recipe.tune_blocks)
    model = TunedClip(encoder, start, recipe.lora, recipe.seed)
    objective = build_objective(recipe, encoder.embed_dim)
    objective.module.to(recipe.device)
    cache = PrefixCache(recipe.cache_dir, encoder.version, start, CONTRACT.size) if recipe.prefix_cache else None
    variants = recipe.augment_variants if recipe.augment else 1
    first = augmentation_key(recipe.seed, 0, recipe.augment)
    train = [[Entry(s, augmentation_key(recipe.seed, v, recipe.augment)) for s in splits.train]
             for v in range(variants)]
    val = [Entry(s, first) for s in splits.val]
    test = [Entry(s, first) for s in splits.test]
    held = [Entry(s, NO_AUGMENTATION) for s in splits.held_out]
    log.info("train.start", method=recipe.method, mode=recipe.mode, backbone=encoder.version,
             tuned_blocks=f"{start}..{vit.num_layers(encoder) - 1}", train=len(splits.train), val=len(val),
             test=len(test), held_out=len(splits.held_out), cache=str(cache.directory) if cache else None)
    bars = Bars(recipe.progress)
    checkpoint_dir = recipe.resolved_checkpoint_dir()
    with Feed(model, settings.intake, cache, recipe.device, recipe.batch_size) as feed, bars.running():
        warm_started = time.perf_counter()
        everything = [e for variant in train for e in variant] + val + test + held
        advance = bars.task("prefix cache" if cache else "checking images", len(everything))
        usable = set(feed.warm(everything, advance))
        warm_seconds = time.perf_counter() - warm_started
        log.info("train.inputs_ready", entries=len(everything), usable=len(usable), seconds=round(warm_seconds, 1))
        train = [[e for e in variant if e in usable] for variant in train]
        val, test = [e for e in val if e in usable], [e for e in test if e in usable]
        held = [e for e in held if e in usable]
        loop = LoopConfig(recipe.epochs, recipe.batch_size, recipe.lr, recipe.weight_decay, recipe.patience,
                          recipe.seed, recipe.resolved_head_lr)
        result = fit(model, objective, feed, train, val, loop, checkpoint_dir, recipe.fingerprint(),
                     resume=recipe.resume, bars=bars)
        model.load_weights(result.best_weights)
        val_logits = predict(model, objective, feed, val, recipe.batch_size)
        test_logits = predict(model, objective, feed, test, recipe.batch_size)
    # Held-out images are scored from their pixels in fp32, as the worker serves them: the prefix cache's
    # fp16 hidden states move a logit by ~1e-3, and LOSO thresholds are chosen on these very scores.
    with Feed(model, settings.intake, None, recipe.device, recipe.batch_size) as exact:
        held_logits = predict(model, objective, exact, held, recipe.batch_size)
    val_labels = [e.sample.label for e in val]
    calibration = fit_calibration(val_logits.tolist(), val_labels, method="temperature",
                                  fitted_on=f"val split of {', '.join(recipe.data)} (seed {recipe.seed})")
    report: dict[str, Any] = {
        "method": recipe.method,
        "mode": recipe.mode,
        "command": recipe.command(),
        "counts": {"train": len(train[0]), "val": len(val), "test": len(test), "held_out": len(splits.held_out)},
        "holdout": {"generators": list(recipe.holdout_generators), "sources": list(recipe.holdout_sources)},
        "epochs": result.state.history,
        "best_epoch": result.state.best_epoch,
        "stopped_early": result.state.stopped_early,
        "calibration": {"scale": calibration.scale, "bias": calibration.bias,
                        "val_before": asdict(quality(val_logits.tolist(), val_labels, Calibration())),
                        "val_after": asdict(quality(val_logits.tolist(), val_labels, calibration))},
        "val": _grouped(val, val_logits, calibration),
        "timing": {"inputs_s": round(warm_seconds, 1), "total_s": round(time.perf_counter() - started, 1)},
    }
    if test:
        report["test"] = _grouped(test, test_logits, calibration)
    if held:
        report["held_out_original"] = _grouped(held, held_logits, calibration)
    meta = {
        "method": recipe.method,
        "backbone": encoder.version,
        "embed_dim": encoder.embed_dim,
        "tuned_blocks": list(range(start, vit.num_layers(encoder))),
        "lora": asdict(recipe.lora),
        "recipe": recipe.fingerprint(),
        "command": recipe.command(),
    }
    save_detector(recipe.out, result.best_weights, recipe.lora, encoder, meta)
    calibration.save(recipe.out)
    report["version"] = builtin_detectors()[recipe.method].version(recipe.out)
    if held:
        save_held_out(recipe.out, held_out_scores([e.sample for e in held], held_logits, calibration),
                      report["holdout"], report["version"])
    else:
        (recipe.out / HELD_OUT_FILE).unlink(missing_ok=True)  # a stale one would pass for this run's
    (recipe.out / TRAINING_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    log.info("train.done", method=recipe.method, version=report["version"], best_epoch=result.state.best_epoch,
             out=str(recipe.out), seconds=report["timing"]["total_s"])
    return report
