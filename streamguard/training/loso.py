"""Leave-one-source-out validation of the built-in detectors, and the fusion weights and thresholds chosen there.

The groups of the ``loso_data`` roots (each generator of their fakes, each source of their real photos) are
packed into folds. Each fold trains every method with that fold's groups held out and scores them on their
original bytes (``held_out.json``); pooled over folds, every image is scored by a model that never saw its
generator or its camera source. Groups of other roots (CIFAKE) are never held out: they are training data.

Only the train and val splits of a held-out group count. The test split stays untouched, so the shipped
models' test results are still a test of settings chosen here.

A fold finished under the same settings is not trained again: rerunning the command after a crash carries on
where it stopped, and a rerun with another sample or more epochs trains afresh (``loso_run.json``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from streamguard.config import Settings
from streamguard.detectors.calibration import sigmoid
from streamguard.evaluation.datasets import FAKE, Sample
from streamguard.evaluation.perturb import PERTURBATIONS
from streamguard.evaluation.selection import (
    FusedCalibration,
    Scored,
    ThresholdChoice,
    WeightChoice,
    auc_by_group,
    balanced_auc,
    bootstrap_auc,
    bootstrap_policy,
    carried_over_auc,
    choose_thresholds,
    choose_weights,
    fit_fused_calibration,
    fuse,
    operating_point,
    operating_points,
    policy_carry_over,
    verdict_rates,
)
from streamguard.intake.contract import RESIZE, InputContract, with_views
from streamguard.training.held_out import (HELD_OUT_FILE, HeldOutScore, fold_folders, load_held_out,
                                          load_variant_scores)
from streamguard.training.matched import TWIN_FORMAT
from streamguard.training.nirnet.recipe import ABLATIONS as NIRNET_ABLATIONS
from streamguard.training.renders import RENDER_VERSION
from streamguard.training.twins import asked_of, asked_twins, twin_settings

log = structlog.get_logger(__name__)

LOSO_METHODS = ("univfd", "pin-clip", "mpft", "nirnet")
# What `train loso` validates unless told: the detectors with shipped weights (nirnet joins once it ships).
DEFAULT_METHODS = ("univfd", "pin-clip", "mpft")
# Measured against the shipped methods: univfd's probe on every CLIP block's class token (what univfd ships
# since 2026-12-03), and, not shipped, that probe with each block's mean patch token too (univfd-tokens),
# probes on frozen DINOv2 ViT-S/14 features (block 6, or every block as univfd-blocks reads CLIP's) and
# RIGID's training-free noise-stability score on them.
CANDIDATE_METHODS = ("univfd-blocks", "univfd-tokens", "dinov2-probe", "dinov2-blocks", "rigid", *NIRNET_ABLATIONS)
# Probes on frozen features: trained in one fit, so --epochs does not touch them.
PROBE_METHODS = ("univfd", "univfd-blocks", "univfd-tokens", "dinov2-probe", "dinov2-blocks", "rigid")
# Fine-tuned on the CLIP trunk by `training.recipe` (LoRA and a head).
FINE_TUNED = ("pin-clip", "mpft")
# Whose real class also takes the rendered screenshots and the feed twins.
SCREEN_TAKERS = PROBE_METHODS + FINE_TUNED
REPORT_FILE = "loso.json"
# The settings a fold folder's run was trained under, beside its held_out.json.
RUN_FILE = "loso_run.json"


@dataclass(frozen=True)
class Fold:
    name: str
    generators: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    def holdout(self) -> dict[str, list[str]]:
        return {"generators": list(self.generators), "sources": list(self.sources)}


def groups_of(samples: Sequence[Sample]) -> dict[str, tuple[str, int]]:
    """``{group: (kind, images outside the test split)}``, kind ``generator`` or ``source``."""
    out: dict[str, tuple[str, int]] = {}
    for s in samples:
        kind = "generator" if s.label == FAKE else "source"
        _, n = out.get(s.group, (kind, 0))
        out[s.group] = (kind, n + (s.split != "test"))
    return out


def _slug(names: Sequence[str]) -> str:
    return "+".join(re.sub(r"[^A-Za-z0-9.-]+", "_", n) for n in names)


# A held-out group of fewer images says little on its own and weighs as much as any other in the balanced
# metrics; wild-more has a dozen generators with one to seven images. Those are pooled by family.
MIN_GROUP_IMAGES = 8


def pool_groups(samples: Sequence[Sample], min_images: int = MIN_GROUP_IMAGES) -> dict[str, str]:
    """``{group: the group it is held out and reported with}``.

    A generator with fewer than ``min_images`` images outside the test split joins ``small-<family>``, and
    a family pool still under that joins ``small-other``; a small real source joins ``small-real``. Groups
    of a useful size keep their own name. Deterministic for given samples.
    """
    groups = groups_of(samples)
    family = {s.group: s.family for s in samples if s.label == FAKE}
    pooled: dict[str, str] = {}
    for name, (kind, n) in groups.items():
        if n >= min_images:
            pooled[name] = name
        elif kind == "source":
            pooled[name] = "small-real"
        else:
            pooled[name] = f"small-{family[name]}" if family[name] not in ("unknown", "real") else "small-other"
    sizes: dict[str, int] = {}
    for name, pool in pooled.items():
        sizes[pool] = sizes.get(pool, 0) + groups[name][1]
    for name, pool in pooled.items():
        if pool.startswith("small-") and pool != "small-real" and sizes[pool] < min_images:
            pooled[name] = "small-other"
    return pooled


def plan_folds(groups: dict[str, tuple[str, int]], n_folds: int | None = None,
               pools: dict[str, str] | None = None) -> list[Fold]:
    """Pack groups into ``n_folds`` folds (default: one per group, or per pool), balanced by image count.

    ``pools`` (from `pool_groups`) keeps each pool's groups in one fold. Real sources go to different folds
    first, so each fold keeps other real photos to train on; then each generator, largest first, joins the
    fold with fewest images. Deterministic for given groups.
    """
    pools = pools or {g: g for g in groups}
    units: dict[str, list[str]] = {}
    for g in sorted(groups):
        units.setdefault(pools.get(g, g), []).append(g)
    kind = {u: groups[members[0]][0] for u, members in units.items()}
    size = {u: sum(groups[g][1] for g in members) for u, members in units.items()}
    names = sorted(units, key=lambda u: (kind[u] != "source", -size[u], u))
    n = len(names) if n_folds is None else n_folds
    if not 1 <= n <= len(names):
        raise ValueError(f"folds must be between 1 and the number of groups ({len(names)}), not {n}")
    bins: list[list[str]] = [[] for _ in range(n)]
    sizes = [0] * n
    for name in names:
        i = min(range(n), key=lambda k: (sizes[k], k))
        bins[i].append(name)
        sizes[i] += size[name]
    folds = []
    for b in bins:
        members = [g for u in b for g in units[u]]
        folds.append(Fold(_slug(b), tuple(g for g in members if groups[g][0] == "generator"),
                          tuple(g for g in members if groups[g][0] == "source")))
    return folds


@dataclass(frozen=True)
class LosoConfig:
    data: tuple[str, ...]
    loso_data: tuple[str, ...]
    out: Path
    methods: tuple[str, ...] = DEFAULT_METHODS
    folds: int | None = None
    seed: int = 0
    augment_seed: int | None = None  # univfd's augmentation draw apart from the split (`TrainConfig`)
    augment_draws: int = 3  # univfd's training rows per image (`TrainConfig`)
    limit_per_group: int | None = None
    epochs: int = 5
    device: str = "cpu"
    cache_dir: Path = Path(".cache/train")
    progress: bool = False
    max_false_flag: float = 0.02
    max_false_clear: float = 0.10
    weight_step: float = 0.1
    fold_names: tuple[str, ...] = field(default=())  # run only these folds (the report needs all)
    min_group_images: int = MIN_GROUP_IMAGES
    # Detectors not retrained per fold, with `eval` scores (scores.csv) on loso data they never trained on:
    # pooled as held-out scores, so the report covers the images they scored (the intersection).
    unseen_scores: tuple[tuple[str, Path], ...] = ()
    report_name: str = REPORT_FILE
    # The view the fold models' scores are pooled under (`train loso-variants --variant VIEW` scored them): the
    # fusion and thresholds of detectors served with `detectors.options.<name>.views`.
    view: str = RESIZE
    # The view the probe methods learn from (`TrainConfig.view`); their held_out.json is scored resized still,
    # and `view` set to the same crop view pools their scores under it.
    train_view: str = RESIZE
    # What the probe methods' C and class-token blocks are chosen on (`TrainConfig.choose_on`).
    choose_on: Literal["groups", "val", "average"] = "average"
    # ... fitted blind to the directions training's real sources differ along (`TrainConfig.without_source_directions`).
    without_source_directions: bool = False
    # Other reports in ``out`` whose fused verdict this one's is compared with, paired on the images both scored.
    against: tuple[str, ...] = ()
    # pin-clip's recipe for its folds (`PinClipConfig` fields by name: mode, beta, noise_scale, attn_dim), so
    # its noise is tuned on groups left out, never on the val split of sources it trained on.
    pin_clip: tuple[tuple[str, str | float | int], ...] = ()
    # The probe methods also learn from real training photos' generated twins (`TrainConfig.matched_fakes`).
    matched_fakes: bool = False
    # The probe methods' augmentation re-encodes half the images as JPEG at native size (`TrainConfig.native_jpeg`).
    native_jpeg: bool = False
    # The probe methods' augmentation mirrors half the images left to right (`TrainConfig.mirror`).
    mirror: bool = False
    # The probe methods' real class also holds this many procedural screenshots (`TrainConfig.rendered_screens`).
    rendered_screens: int = 0
    # ... and this many real training photos' night-mode twins (`TrainConfig.night_twins`).
    night_twins: int = 0
    # ... and this many shown as a post in a feed's screenshot (`TrainConfig.feed_twins`).
    feed_twins: int = 0
    # ... and this many generated training images as such posts, generated (`TrainConfig.feed_fake_twins`).
    feed_fake_twins: int = 0
    # ... and this many real training photos' portraits of the person in them (`TrainConfig.portrait_twins`).
    portrait_twins: int = 0
    # ... and this many training images of each class made into memes, each in its class (`TrainConfig.meme_twins`).
    meme_twins: int = 0
    # The fine-tuned methods' LoRA'd last blocks (`Recipe.tune_blocks`); None keeps the recipe's own.
    tune_blocks: int | None = None
    # Perturbations (jpeg75, downscale0.5) whose copies of the held-out images the thresholds must hold on too,
    # as `train loso-variants --variant VIEW@NAME` scored them: the fusion is still chosen on the original bytes.
    policy_copies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in LOSO_METHODS + CANDIDATE_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be among {LOSO_METHODS + CANDIDATE_METHODS}, not {list(self.methods)}")
        if not self.loso_data:
            raise ValueError("name the data whose sources are held out (loso_data)")
        missing = [d for d in self.loso_data if d not in self.data]
        if missing:
            raise ValueError(f"held-out data must also be training data: {missing}")
        with_views(InputContract(), self.view)  # refuses a name that is no view
        with_views(InputContract(), self.train_view)
        if self.train_view != RESIZE and any(m not in PROBE_METHODS for m in self.methods):
            raise ValueError(f"a training view other than {RESIZE} is for the probe methods {PROBE_METHODS}")
        from streamguard.training.probe_choice import refuse_unaveraged_blindness  # it imports this module

        refuse_unaveraged_blindness(self.choose_on, self.without_source_directions)
        if self.pin_clip:
            if "pin-clip" not in self.methods:
                raise ValueError("pin-clip's recipe is set but pin-clip is not among the methods")
            pin_clip_config(self)  # refuses an unknown name or a value the recipe would refuse, before any fold
        # What only the probe methods' training has: set for none of the methods, it would silently do nothing.
        probe_only = {"matched fakes are": self.matched_fakes, "the native JPEG re-encode is": self.native_jpeg,
                      "the mirror images are": self.mirror, "night-mode twins are": self.night_twins,
                      "generated feed twins are": self.feed_fake_twins, "portrait twins are": self.portrait_twins,
                      "meme twins are": self.meme_twins}
        for what, asked in probe_only.items():
            if asked and not any(m in PROBE_METHODS for m in self.methods):
                raise ValueError(f"{what} for the probe methods {PROBE_METHODS}")
        for what, asked in {"rendered screens are": self.rendered_screens, "feed twins are": self.feed_twins}.items():
            if asked and not any(m in SCREEN_TAKERS for m in self.methods):
                raise ValueError(f"{what} for the probe and fine-tuned methods {SCREEN_TAKERS}")
        if self.tune_blocks is not None:
            if not any(m in FINE_TUNED for m in self.methods):
                raise ValueError(f"tuned blocks are for the fine-tuned methods {FINE_TUNED}")
            if self.tune_blocks < 1:
                raise ValueError(f"tune_blocks must be 1 or more, not {self.tune_blocks}")
        if self.rendered_screens < 0:
            raise ValueError(f"rendered_screens must be 0 or more, not {self.rendered_screens}")
        asked_of(self)  # refuses < 0
        unknown_copies = [c for c in self.policy_copies if c not in PERTURBATIONS]
        if unknown_copies or len(set(self.policy_copies)) < len(self.policy_copies):
            raise ValueError(f"policy copies must be distinct perturbations among {sorted(PERTURBATIONS)}, not "
                             f"{list(self.policy_copies)}")


PIN_CLIP_TUNABLE: dict[str, type] = {"mode": str, "beta": float, "noise_scale": float, "attn_dim": int}


def pin_clip_config(cfg: LosoConfig) -> Any:
    """The `PinClipConfig` of pin-clip's folds: the recipe's defaults, with ``cfg.pin_clip`` over them."""
    from streamguard.training.pinclip import PinClipConfig

    unknown = sorted({name for name, _ in cfg.pin_clip} - set(PIN_CLIP_TUNABLE))
    if unknown:
        raise ValueError(f"pin-clip's recipe has no {unknown}: tunable are {sorted(PIN_CLIP_TUNABLE)}")
    try:
        return PinClipConfig(**{name: PIN_CLIP_TUNABLE[name](value) for name, value in cfg.pin_clip})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"pin-clip's recipe: {exc}") from None


def pin_clip_changes(cfg: LosoConfig) -> dict[str, Any]:
    """What pin-clip's folds change in its recipe, as values: a default named (mode=learned) or spelled
    otherwise (beta=0.0010) is the same run."""
    if not cfg.pin_clip:
        return {}
    tuned = pin_clip_config(cfg)
    default = asdict(type(tuned)())
    return {name: value for name, value in asdict(tuned).items() if value != default[name]}


def tune_blocks_change(cfg: LosoConfig) -> int | None:
    """The fine-tuned methods' tuned blocks where they differ from their recipe's own: the recipe's default
    spelled out (--tune-blocks 2) is the same run, as a pin-clip default named is."""
    if cfg.tune_blocks is None:
        return None
    from streamguard.training.recipe import Recipe

    return None if cfg.tune_blocks == Recipe.tune_blocks else cfg.tune_blocks


def fold_dir(cfg: LosoConfig, method: str, fold: Fold) -> Path:
    return cfg.out / method / fold.name


def run_settings(cfg: LosoConfig, method: str) -> dict[str, Any]:
    """What a fold's run depends on besides its hold-out. A rerun into the same --out under other settings
    (another --limit-per-group sample, more epochs) trains again instead of pooling the old run's scores."""
    settings = {"method": method, "data": list(cfg.data), "seed": cfg.seed, "limit_per_group": cfg.limit_per_group,
                "epochs": None if method in PROBE_METHODS else cfg.epochs}
    # Recorded only when not resized, so the folds trained before training views existed stay valid.
    settings |= {"train_view": cfg.train_view} if cfg.train_view != RESIZE else {}
    # Recorded only when set, so the folds trained on the recipe's defaults stay valid.
    changes = pin_clip_changes(cfg) if method == "pin-clip" else {}
    settings |= {"pin_clip": changes} if changes else {}
    # Folds chosen on the val split (before 2026-12-04) keep the settings they were recorded under; so do
    # folds of the seed's own augmentation draw. Folds recorded without augment_draws had one.
    draw = cfg.augment_seed not in (None, cfg.seed)
    settings |= {"augment_seed": cfg.augment_seed} if method in PROBE_METHODS and draw else {}
    settings |= {"augment_draws": cfg.augment_draws} if method in PROBE_METHODS and cfg.augment_draws != 1 else {}
    # The twins' recipe, so folds trained on an earlier one (lossless twins) are trained again.
    settings |= {"matched_fakes": TWIN_FORMAT} if method in PROBE_METHODS and cfg.matched_fakes else {}
    settings |= {"native_jpeg": True} if method in PROBE_METHODS and cfg.native_jpeg else {}
    settings |= {"mirror": True} if method in PROBE_METHODS and cfg.mirror else {}
    settings |= {"without_source_directions": True} if method in PROBE_METHODS and cfg.without_source_directions else {}
    screens = method in SCREEN_TAKERS and cfg.rendered_screens
    settings |= {"rendered_screens": [cfg.rendered_screens, RENDER_VERSION]} if screens else {}
    settings |= twin_settings(asked_of(cfg)) if method in PROBE_METHODS else {}
    settings |= twin_settings(asked_twins(feed=cfg.feed_twins)) if method in FINE_TUNED else {}
    blocks = tune_blocks_change(cfg) if method in FINE_TUNED else None
    settings |= {"tune_blocks": blocks} if blocks is not None else {}
    return settings | ({"choose_on": cfg.choose_on} if method in PROBE_METHODS and cfg.choose_on != "val" else {})


def _finished(cfg: LosoConfig, method: str, fold: Fold, say: bool = True) -> list[HeldOutScore] | None:
    """The held-out scores of a finished run of ``fold`` under ``cfg``'s settings; None when there is none.
    ``say``: log a fold kept unchecked (once per run is enough: pooling asks again)."""
    directory = fold_dir(cfg, method, fold)
    if not (directory / HELD_OUT_FILE).is_file():
        return None
    holdout, scores = load_held_out(directory)
    if holdout != fold.holdout():
        return None
    run_file = directory / RUN_FILE
    if not run_file.is_file():
        # Fold folders written before the settings were recorded (before December 2026) are trusted as they
        # were: retraining them costs hours, and the log says which ones were not checked.
        if say:
            log.warning("loso.fold_settings_unrecorded", method=method, fold=fold.name, directory=str(directory))
        return scores
    recorded = json.loads(run_file.read_text())
    if recorded != run_settings(cfg, method):
        log.info("loso.fold_settings_changed", method=method, fold=fold.name, recorded=recorded)
        return None
    return scores


def train_fold(settings: Settings, cfg: LosoConfig, method: str, fold: Fold) -> Path:
    """Train ``method`` with ``fold`` held out (unless already done); returns its directory."""
    directory = fold_dir(cfg, method, fold)
    if _finished(cfg, method, fold) is not None:
        log.info("loso.fold_done_before", method=method, fold=fold.name)
        return directory
    # Gone until this run has finished: a crash must not leave an older run's scores under these settings.
    (directory / RUN_FILE).unlink(missing_ok=True)
    log.info("loso.fold_start", method=method, fold=fold.name, generators=list(fold.generators),
             sources=list(fold.sources))
    if method in PROBE_METHODS:
        from streamguard.training.univfd import TrainConfig, train_univfd

        train_univfd(settings, TrainConfig(
            data=cfg.data, out=directory, seed=cfg.seed, augment_seed=cfg.augment_seed,
            augment_draws=cfg.augment_draws, limit_per_group=cfg.limit_per_group, device=cfg.device,
            cache_dir=cfg.cache_dir, holdout_generators=fold.generators, holdout_sources=fold.sources,
            backbone={"univfd": "clip", "univfd-blocks": "clip-blocks",
                      "univfd-tokens": "clip-tokens", "dinov2-probe": "dinov2",
                      "dinov2-blocks": "dinov2-blocks",
                      "rigid": "rigid"}[method], view=cfg.train_view, choose_on=cfg.choose_on,  # type: ignore[arg-type]
            without_source_directions=cfg.without_source_directions,
            matched_fakes=cfg.matched_fakes, native_jpeg=cfg.native_jpeg, mirror=cfg.mirror,
            rendered_screens=cfg.rendered_screens,
            night_twins=cfg.night_twins, feed_twins=cfg.feed_twins, feed_fake_twins=cfg.feed_fake_twins,
            portrait_twins=cfg.portrait_twins, meme_twins=cfg.meme_twins))
    elif method == "nirnet" or method in NIRNET_ABLATIONS:
        from streamguard.training.nirnet.recipe import NirnetRecipe
        from streamguard.training.nirnet.train import train_nirnet

        # Its own checkpoints per fold (keyed by the fold's folder): a fold's run never resumes another fold's.
        train_nirnet(settings, _resuming(NirnetRecipe(
            data=cfg.data, out=directory, seed=cfg.seed, epochs=cfg.epochs, limit_per_group=cfg.limit_per_group,
            holdout_generators=fold.generators, holdout_sources=fold.sources, device=cfg.device,
            cache_dir=cfg.cache_dir, progress=cfg.progress, **NIRNET_ABLATIONS.get(method, {}))))
    else:
        from streamguard.training.recipe import Recipe, train_detector

        tuned = {"pinclip": pin_clip_config(cfg)} if method == "pin-clip" else {}
        blocks = {"tune_blocks": cfg.tune_blocks} if cfg.tune_blocks is not None else {}
        train_detector(settings, _resuming(Recipe(
            method=method, data=cfg.data, out=directory, seed=cfg.seed, epochs=cfg.epochs,  # type: ignore[arg-type]
            limit_per_group=cfg.limit_per_group, holdout_generators=fold.generators, holdout_sources=fold.sources,
            device=cfg.device, cache_dir=cfg.cache_dir, progress=cfg.progress, rendered_screens=cfg.rendered_screens,
            feed_twins=cfg.feed_twins, **tuned, **blocks)))
    (directory / RUN_FILE).write_text(json.dumps(run_settings(cfg, method), indent=1) + "\n")
    return directory


def _resuming(recipe: Any) -> Any:
    """The recipe, resuming the epochs a killed run of this fold checkpointed (its fold folder's checkpoint,
    written under the same recipe); a fold's run is half an hour of CPU and more."""
    from dataclasses import replace

    from streamguard.training.checkpoint import resumable

    return replace(recipe, resume=resumable(recipe.resolved_checkpoint_dir(), recipe.fingerprint()))


def pooled_scores(cfg: LosoConfig, method: str, folds: Sequence[Fold], variant: str | None = None,
                  ) -> list[HeldOutScore]:
    """The method's held-out scores over every fold, outside the test split, under ``cfg.view`` or under
    ``variant`` (a `train loso-variants` variant name, ``VIEW@PERTURBATION``)."""
    variant = variant or cfg.view
    out: list[HeldOutScore] = []
    for fold in folds:
        directory = fold_dir(cfg, method, fold)
        scores = _finished(cfg, method, fold, say=False)
        if scores is None:
            raise ValueError(f"{method} has no finished run for fold {fold.name} in {directory}")
        wanted = [s for s in scores if s.split != "test"]
        if variant != RESIZE:
            wanted = _under_view(variant, method, directory, wanted)
        out.extend(wanted)
    return out


def _under_view(view: str, method: str, directory: Path, wanted: list[HeldOutScore]) -> list[HeldOutScore]:
    """``wanted``'s images as the fold's model (in ``directory``) scored them under ``view``: every one of them,
    or a refusal (a subsample would choose the policy on fewer images than the resized view's report)."""
    hint = f"`streamguard train loso-variants ... --method {method} --variant {view}` (no --limit-per-group)"
    try:
        scored = {s.id: s for s in load_variant_scores(directory, view)}
    except FileNotFoundError:
        raise ValueError(f"{method} fold {directory.name} has no scores under view {view}: score them with "
                         f"{hint}") from None
    missing = [s.id for s in wanted if s.id not in scored]
    if missing:
        raise ValueError(f"{method} fold {directory.name} scored {len(wanted) - len(missing)} of its {len(wanted)} "
                         f"held-out images under view {view}: score the rest with {hint}")
    return [scored[s.id] for s in wanted]


def scored_together(pooled: dict[str, list[HeldOutScore]],
                    pools: dict[str, str] | None = None) -> tuple[Scored, list[str]]:
    """The images every method scored, in one order, with each method's calibrated logit; grouped by pool."""
    by_method = {m: {s.id: s for s in scores} for m, scores in pooled.items()}
    ids = sorted(set.intersection(*(set(v) for v in by_method.values())))
    first = by_method[next(iter(by_method))]
    labels = np.array([first[i].label for i in ids], np.int64)
    groups = tuple((pools or {}).get(first[i].group, first[i].group) for i in ids)
    logits = {m: np.array([v[i].logit for i in ids]) for m, v in by_method.items()}
    return Scored(labels, groups, logits), ids


def summarise(scored: Scored, probs: np.ndarray, ai_threshold: float, real_threshold: float) -> dict[str, Any]:
    rates = verdict_rates(scored.labels, scored.groups, probs, ai_threshold, real_threshold)
    reals = [r for r in rates.values() if r["kind"] == "real"]
    fakes = [r for r in rates.values() if r["kind"] == "ai"]
    auc = balanced_auc(scored.labels, scored.groups, probs)
    against = auc_by_group(scored.labels, scored.groups, probs)
    return {
        "balanced_auc": None if auc is None else round(auc, 4),
        "worst_real_accuracy_at_0.5": min(float(r["accuracy_at_0.5"]) for r in reals),
        "mean_fake_accuracy_at_0.5": round(float(np.mean([float(r["accuracy_at_0.5"]) for r in fakes])), 4),
        # Each group's AUC against the other class: a class's groups average to the balanced AUC.
        "groups": {g: {**r, "auc": round(against[g], 4) if g in against else None} for g, r in rates.items()},
    }


def run_loso(settings: Settings, cfg: LosoConfig) -> dict[str, Any]:
    """Train every fold that is not done, then pool, choose and write ``loso.json``; returns the report."""
    from streamguard.evaluation import load_samples

    held = load_samples(cfg.loso_data, seed=cfg.seed, limit_per_group=cfg.limit_per_group)
    pools = pool_groups(held, cfg.min_group_images)
    folds = plan_folds(groups_of(held), cfg.folds, pools)
    chosen = [f for f in folds if not cfg.fold_names or f.name in cfg.fold_names]
    unknown = set(cfg.fold_names) - {f.name for f in folds}
    if unknown:
        raise ValueError(f"no fold named {sorted(unknown)}: folds are {[f.name for f in folds]}")
    log.info("loso.plan", folds=[f.name for f in folds], methods=list(cfg.methods))
    for fold in chosen:
        for method in cfg.methods:
            train_fold(settings, cfg, method, fold)
    if len(chosen) < len(folds):
        return {"folds": [asdict(f) for f in folds], "trained": [f.name for f in chosen]}
    report = build_report(cfg, folds, pools)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / cfg.report_name).write_text(json.dumps(report, indent=2) + "\n")
    return report


def score_logit(score: str) -> float:
    """The logit of an `eval` scores.csv probability, clipped so a saturated 0 or 1 stays finite."""
    import math

    p = min(max(float(score), 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def read_unseen_scores(path: Path, view: str = RESIZE) -> list[HeldOutScore]:
    """An `eval` scores.csv (unperturbed rows, outside the test split) as held-out scores: its probabilities
    are the detector's calibrated ones, so their logits are what fusion averages. A folder is one method of
    another `train loso` run (``<out>/<method>``): its folds' held-out scores, outside the test split, under
    ``view`` as its own `train loso-variants` scored them (all of them, as for this run's methods). A
    method too slow to train on one fold per group (pin-clip: ~20 CPU minutes a fold) can then be packed
    into fewer folds and still be fused with the per-group ones; every image is still scored by a model that
    never saw its group. A scores.csv is taken as it is: `eval` scored it under the detector's own views, and
    ``view`` names only which perturbation's rows to read (``VIEW@PERTURBATION``; unperturbed without one)."""
    import csv

    out: list[HeldOutScore] = []
    perturbation = view.partition("@")[2] or "none"
    if path.is_dir():
        for d in fold_folders(path):
            wanted = [s for s in load_held_out(d)[1] if s.split != "test"]
            out += wanted if view == RESIZE else _under_view(view, path.name, d, wanted)
        if not out:
            raise ValueError(f"{path}: no fold with a {HELD_OUT_FILE} outside the test split (a `train loso` "
                             "--out folder's method folder, e.g. .cache/loso/pin-clip)")
        return out
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["perturbation"] != perturbation or row["split"] == "test" or not row["score"]:
                continue
            out.append(HeldOutScore(row["id"], int(row["label"]), row["generator"], row["source"], row["split"],
                                    score_logit(row["score"])))
    if not out:
        raise ValueError(f"{path}: no {perturbation} scores outside the test split")
    return out


def _mean_one(weights: dict[str, float]) -> dict[str, float]:
    """The same fusion, scaled so the weights average 1: the weight every other detector gets by default
    (``fusion.default_weight``) then keeps its meaning, an average detector's say."""
    mean = sum(weights.values()) / len(weights)
    return {name: round(w / mean, 4) for name, w in weights.items()}


def choose_fusion(scored: Scored, weight_step: float, rows: np.ndarray | None = None,
                  ) -> tuple[WeightChoice | None, FusedCalibration, np.ndarray]:
    """The fusion weights (None for one detector) and the fused logit's calibration chosen on ``rows`` (a mask;
    None: every image), and every image's fused probability under them."""
    on = scored if rows is None else scored.only(rows)
    weights = choose_weights(on, weight_step) if len(scored.logits) > 1 else None
    # Each fold calibrated on the validation split of the sources it saw, which says little about sources it
    # did not: the pooled held-out scores recalibrate the fused logit, and the thresholds are chosen on that.
    calibration = fit_fused_calibration(on.labels, on.groups, fuse(on.logits, _weighing(on.logits, weights)))
    return weights, calibration, fused_probs(scored.logits, weights, calibration)


def _weighing(logits: Mapping[str, np.ndarray], weights: WeightChoice | None) -> dict[str, float]:
    return weights.weights if weights else {next(iter(logits)): 1.0}


def fused_probs(logits: Mapping[str, np.ndarray], weights: WeightChoice | None,
                calibration: FusedCalibration) -> np.ndarray:
    """What the product publishes for these logits under a chosen fusion (None: the one detector alone)."""
    return sigmoid(calibration.scale * fuse(logits, _weighing(logits, weights)) + calibration.bias)


def every_detector(cfg: LosoConfig, folds: Sequence[Fold], variant: str) -> dict[str, list[HeldOutScore]]:
    """The held-out scores under ``variant`` of each fold-trained method, then of each unseen detector."""
    pooled = {m: pooled_scores(cfg, m, folds, variant) for m in cfg.methods}
    for name, path in cfg.unseen_scores:
        pooled[name] = read_unseen_scores(path, variant)
    return pooled


def copy_logits(cfg: LosoConfig, folds: Sequence[Fold], copy: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Each detector's logits of ``ids`` (the report's images, in its order) on their ``copy`` perturbed
    copies, as `train loso-variants --variant VIEW@COPY` scored them (``cfg.view``'s view)."""
    variant = f"{cfg.view}@{copy}"
    out = {}
    for method, scores in every_detector(cfg, folds, variant).items():
        by_id = {s.id: s.logit for s in scores}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"{method} scored {len(ids) - len(missing)} of the report's {len(ids)} images under "
                             f"{variant} (not {missing[0]}, ...): every image needs its {copy} copy scored")
        out[method] = np.array([by_id[i] for i in ids])
    return out


def build_report(cfg: LosoConfig, folds: Sequence[Fold], pools: dict[str, str] | None = None) -> dict[str, Any]:
    pooled = every_detector(cfg, folds, cfg.view)
    scored, ids = scored_together(pooled, pools)
    methods = list(pooled)
    weights, calibration, fused = choose_fusion(scored, cfg.weight_step)
    copies = {c: copy_logits(cfg, folds, c, ids) for c in cfg.policy_copies}

    def with_copies(chosen: WeightChoice | None, cal: FusedCalibration, probs: np.ndarray) -> np.ndarray:
        """``probs`` (the original bytes') and every copy's probabilities under the same fusion, stacked."""
        return np.stack([probs, *(fused_probs(logits, chosen, cal) for logits in copies.values())])

    def refit(rest: np.ndarray) -> np.ndarray:
        """Every copy's probabilities under the fusion chosen on ``rest``'s original bytes, originals first."""
        return with_copies(*choose_fusion(scored, cfg.weight_step, rest))

    every_copy = with_copies(weights, calibration, fused)
    thresholds = choose_thresholds(scored.labels, scored.groups, every_copy, cfg.max_false_flag, cfg.max_false_clear)
    detectors = {m: summarise(scored, sigmoid(scored.logits[m]), thresholds.ai_threshold, thresholds.real_threshold)
                 for m in methods}
    if weights is not None:
        equal_logit = fuse(scored.logits, {m: 1.0 for m in methods})
        equal_cal = fit_fused_calibration(scored.labels, scored.groups, equal_logit)
        equal = sigmoid(equal_cal.scale * equal_logit + equal_cal.bias)
        detectors["fused-equal"] = summarise(scored, equal, thresholds.ai_threshold, thresholds.real_threshold)
    # What the product publishes, even from one detector: the recalibrated score the thresholds were chosen on.
    detectors["fused"] = summarise(scored, fused, thresholds.ai_threshold, thresholds.real_threshold)
    fused_scores = {i: round(float(p), 6) for i, p in zip(ids, fused, strict=True)}
    return {
        "folds": [asdict(f) for f in folds],
        "pools": {g: p for g, p in sorted((pools or {}).items()) if g != p},
        "data": list(cfg.data),
        "loso_data": list(cfg.loso_data),
        "unseen_scores": {name: str(path) for name, path in cfg.unseen_scores},
        "view": cfg.view,
        "seed": cfg.seed,
        "augment_seed": cfg.seed if cfg.augment_seed is None else cfg.augment_seed,
        "augment_draws": cfg.augment_draws,
        "limit_per_group": cfg.limit_per_group,
        "epochs": cfg.epochs,
        **({"pin_clip": changes} if (changes := pin_clip_changes(cfg)) else {}),
        **({"tune_blocks": n} if (n := tune_blocks_change(cfg)) is not None else {}),
        "images": len(ids),
        "targets": {"max_false_flag": cfg.max_false_flag, "max_false_clear": cfg.max_false_clear},
        "weights": None if weights is None else asdict(weights),
        "thresholds": asdict(thresholds),
        "fused_calibration": asdict(calibration),
        "uncertain_share": round(float(np.mean((fused > thresholds.real_threshold) & (fused < thresholds.ai_threshold))), 4),
        # What the aims the policy misses would cost if the thresholds alone were moved to meet them.
        "operating_points": {name: asdict(p) for name, p in operating_points(
            scored.labels, scored.groups, fused, thresholds, cfg.max_false_flag).items()},
        # The policy on each copy it was chosen to hold on, the original bytes first.
        "policy_copies": policy_on_copies(scored, ["none", *copies], every_copy, thresholds, cfg.max_false_flag)
        if copies else {},
        # The rule on sources it did not see: each group judged under a fusion and thresholds chosen without it.
        "policy_carry_over": [asdict(c) for c in policy_carry_over(
            scored.labels, scored.groups, every_copy, cfg.max_false_flag, cfg.max_false_clear, refit=refit)],
        # The fused ranking the same way: each (real source, generator) pair under the fusion chosen without both.
        "carried_over_auc": None if (carried := carried_over_auc(
            scored.labels, scored.groups, lambda rest: refit(rest)[0])) is None else round(carried, 4),
        "detectors": detectors,
        # Balanced AUCs and every pairwise difference, with 95% intervals from resampling images in their groups.
        "auc_intervals": {k: asdict(v) for k, v in bootstrap_auc(scored).items()},
        "against": {name: compare_fused(cfg, name, scored, fused_scores) for name in cfg.against},
        "settings": {
            "fusion": {"weights": _mean_one(weights.weights) if weights else {methods[0]: 1.0},
                       "scale": calibration.scale, "bias": calibration.bias},
            "policy": {"ai_threshold": thresholds.ai_threshold, "real_threshold": thresholds.real_threshold},
        },
        # Per image, the probability the policy was applied to: what a later report is compared with, paired.
        "fused_scores": fused_scores,
    }


def policy_on_copies(scored: Scored, names: Sequence[str], every_copy: np.ndarray, thresholds: ThresholdChoice,
                     max_false_flag: float) -> dict[str, Any]:
    """The chosen policy's operating point and the balanced AUC on each copy (``names``, original bytes first)."""
    out = {}
    for name, probs in zip(names, every_copy, strict=True):
        auc = balanced_auc(scored.labels, scored.groups, probs)
        point = operating_point(scored.labels, scored.groups, probs, thresholds.ai_threshold,
                                thresholds.real_threshold, max_false_flag)
        out[name] = {"balanced_auc": None if auc is None else round(auc, 4), **asdict(point)}
    return out


def compare_fused(cfg: LosoConfig, name: str, scored: Scored, fused: dict[str, float]) -> dict[str, Any]:
    """This report's fused verdict against report ``name``'s (another view, other detectors or weights) on the
    images both scored: each balanced AUC and the difference, with a paired bootstrap interval; and what each
    one's policy decides, with the thresholds chosen again on each resample of the original bytes
    (`bootstrap_policy`: the copies' scores of the other report are not recorded)."""
    path = cfg.out / name
    other = json.loads(path.read_text()).get("fused_scores")
    if other is None:
        raise ValueError(f"{path} records no per-image fused scores (written before they were): run its "
                         f"`streamguard train loso` command again")
    ids = sorted(fused)
    position = {i: k for k, i in enumerate(ids)}
    common = [i for i in ids if i in other]
    if not common:
        raise ValueError(f"{path} scored none of this report's images")
    rows = np.array([position[i] for i in common])
    paired = Scored(scored.labels[rows], tuple(scored.groups[k] for k in rows),
                    {"this": np.array([fused[i] for i in common]), "other": np.array([other[i] for i in common])})
    intervals = bootstrap_auc(paired)
    policy = bootstrap_policy(paired.labels, paired.groups, paired.logits, cfg.max_false_flag, cfg.max_false_clear)
    return {"images": len(common), "balanced_auc": intervals["this"].value, "other_balanced_auc":
            intervals["other"].value, "difference": asdict(intervals["this - other"]),
            "policy": {key: asdict(value) for key, value in policy.items()}}
