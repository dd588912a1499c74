"""Train NIRNet (arXiv 2503.09314) end to end: imprint statistics, simulator, loop, calibration and files.

`train_nirnet` reads the data roots and splits them as the other trainers do (`training.data.split_samples`:
each sample's seeded split, hold-outs moved to test); `train_on_splits` is the run itself, on given
splits, so leave-one-source-out validation can call it once per fold.

What a step sees: native crops (the detector's own contract preparation: never resized) of training images,
real ones label 0, generated ones label 1, and, with the simulator, real crops imprinted with band-shaped
noise from the training generators' fused imprint statistics as extra label-1 samples. Each simulated fake
keeps the CLIP embedding of the real image it came from: content-matched pairs, so neither the semantic
branch nor the content can tell them apart, only the imprint.

Reproducible: every random choice comes from (seed, epoch, sample) or (seed, epoch, step), so the same
seed gives the same weights and a run resumed after epoch k repeats what the uninterrupted run did next.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from PIL import Image

from streamguard.builtin.nirnet.detector import contract as served_contract
from streamguard.builtin.nirnet.files import version
from streamguard.builtin.nirnet.model import NIRNet, save_model
from streamguard.config import IntakeSettings, Settings
from streamguard.detectors.calibration import Calibration, sigmoid
from streamguard.evaluation.datasets import FAKE, Sample, SampleReader
from streamguard.intake import decode_image, prepare
from streamguard.intake.contract import InputContract, aggregate_logits, crop_pad, prepare_views
from streamguard.training.checkpoint import load_checkpoint, save_checkpoint
from streamguard.training.data import Splits, split_samples
from streamguard.training.held_out import HELD_OUT_FILE, held_out_scores, save_held_out
from streamguard.training.nirnet.autoencoder import TRAINING_CROP, TRAINING_IMAGES, train_autoencoder
from streamguard.training.nirnet.difference import DifferenceAwareLoss
from streamguard.training.nirnet.groups import FitLimits, choose, fit_groups, pooled_groups, read_crops
from streamguard.training.nirnet.imprint import (
    ImprintSimulator,
    ImprintStats,
    describe_imprints,
    imprints_from_json,
    imprints_to_json,
)
from streamguard.training.nirnet.recipe import NirnetRecipe
from streamguard.training.nirnet.residuals import (
    AutoencoderResidual,
    DenoiserResidual,
    ResidualSource,
    VaeResidual,
    VaeUnavailable,
)
from streamguard.training.trainer import Bars, epoch_generator

log = structlog.get_logger(__name__)

NAME = "nirnet"
IMPRINTS_FILE = "imprints.json"
META_FILE = "meta.json"
CARD_FILE = "MODEL_CARD.md"
TRAINING_FILE = "training.json"
EMBED_BATCH = 32


@dataclass
class LoopState:
    """Everything the loop decides from, besides weights: plain values, so checkpoints load weights-only."""

    epoch: int = 0
    best_epoch: int = 0
    best_auc: float = -math.inf
    best_loss: float = math.inf
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class NirnetRun:
    """What a run leaves: the weights directory and the report written beside it (``training.json``)."""

    out: Path
    report: dict[str, Any]


def _seeded(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def _check_splits(splits: Splits) -> None:
    for name in ("train", "val"):
        labels = {s.label for s in getattr(splits, name)}
        if labels != {0, 1}:
            raise ValueError(f"training needs real and generated images in the {name} split, found labels "
                             f"{sorted(labels)} in {len(getattr(splits, name))} samples")


# --- imprint statistics ------------------------------------------------------------------------------------


def residual_source(recipe: NirnetRecipe, train: Sequence[Sample], intake: IntakeSettings) -> ResidualSource:
    """The recipe's residual source; the autoencoder is trained here, on crops of the training split only."""
    if recipe.residual_source == "denoiser":
        return DenoiserResidual()
    if recipe.residual_source.startswith("vae:"):
        try:
            return VaeResidual(recipe.residual_source.removeprefix("vae:"), recipe.device)
        except VaeUnavailable as exc:
            raise ValueError(str(exc)) from None
    chosen = choose(list(train), TRAINING_IMAGES, recipe.seed)
    crops = [pixels for _, pixels in read_crops(chosen, TRAINING_CROP, recipe.seed, intake=intake)]
    side = min((min(c.shape[-2:]) for c in crops), default=0) // 4 * 4
    if side < 8:
        raise ValueError("the autoencoder residual source needs training images of at least 8x8 pixels")
    trained = train_autoencoder(crops, steps=recipe.autoencoder_steps, seed=recipe.seed, crop=min(side, TRAINING_CROP))
    log.info("nirnet.autoencoder_trained", images=len(crops), steps=trained.steps,
             generators=sorted({s.generator for s in chosen if s.label == FAKE}),
             final_loss=round(trained.losses[-1], 5) if trained.losses else None)
    return AutoencoderResidual(trained.model, label=f"s{recipe.seed}")


def difference_loss(recipe: NirnetRecipe) -> DifferenceAwareLoss | None:
    """The Difference-Aware Loss through the operator's VAE, seeded; None when the recipe names none."""
    if recipe.difference_vae is None:
        return None
    try:
        vae = VaeResidual(recipe.difference_vae, recipe.device)
    except VaeUnavailable as exc:
        raise ValueError(f"--difference-vae: {exc}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seeded("nirnet-difference", recipe.seed))
        return DifferenceAwareLoss(vae).to(recipe.device)


def fit_imprints(recipe: NirnetRecipe, train: Sequence[Sample],
                 intake: IntakeSettings) -> tuple[dict[str, ImprintStats], dict[str, Any]]:
    """The simulator's statistics from the training split's generated images: never validation, test or a
    held-out group. A denoiser measures each generator's own imprint, so one statistic per generator (small
    ones pooled with their family); an autoencoder's or VAE's residual is that network's imprint whatever
    image goes in, so one statistic for it."""
    fakes = [s for s in train if s.label == FAKE]
    source = residual_source(recipe, train, intake)
    if isinstance(source, DenoiserResidual):
        group_of: Callable[[Sample], str] = pooled_groups(fakes, recipe.pool_below)
    else:
        def group_of(sample: Sample) -> str:
            return source.name
    limits = FitLimits(max_per_group=recipe.fit_max_per_group, crop=256)
    stats = fit_groups(fakes, source, limits, seed=recipe.seed, group_of=group_of, intake=intake)
    if not stats:
        raise ValueError("no imprint statistics: no readable generated image in the training split")
    # What the statistics saw, for the report: LOSO checks that no held-out group is among them.
    fitted_on = {"residual": source.name, "generators": sorted({s.generator for s in fakes}),
                 "sources": sorted({s.source for s in fakes}), "fakes": len(fakes),
                 "images": sum(s.images for s in stats.values()),
                 "autoencoder_images": len(choose(list(train), TRAINING_IMAGES, recipe.seed))
                 if isinstance(source, AutoencoderResidual) else None}
    log.info("nirnet.imprints_fitted", **fitted_on)
    return stats, fitted_on


# --- inputs ------------------------------------------------------------------------------------------------


class Inputs:
    """Decoded images and their CLIP embeddings. An embedding is computed once per image (frozen encoder,
    the backend's own whole-image preparation) and kept in memory for every epoch."""

    def __init__(self, intake: IntakeSettings, encoder: torch.nn.Module | None, whole: InputContract | None,
                 device: str, cache: Path | None = None) -> None:
        """``cache``: an .npz of embeddings by sample id, read at the start and rewritten with what this run
        added; its name must carry everything an embedding depends on (`embedding_cache`)."""
        self.intake = intake
        self.encoder = encoder
        self.whole = whole
        self.device = torch.device(device)
        self.reader = SampleReader()
        self.embeddings: dict[str, torch.Tensor] = {}
        self._cache = cache if encoder is not None else None
        self._added = 0
        if self._cache is not None and self._cache.is_file():
            stored = np.load(self._cache, allow_pickle=False)
            self.embeddings = {i: torch.from_numpy(x.copy()) for i, x in zip(stored["ids"].tolist(), stored["x"],
                                                                               strict=True)}

    def close(self) -> None:
        self.reader.close()
        if self._cache is not None and self._added:
            ids = sorted(self.embeddings)
            self._cache.parent.mkdir(parents=True, exist_ok=True)
            staged = self._cache.with_suffix(".tmp.npz")
            np.savez(staged, ids=np.asarray(ids), x=np.stack([self.embeddings[i].numpy() for i in ids]))
            staged.replace(self._cache)  # whole or not at all: a killed run leaves the previous cache

    def image(self, sample: Sample) -> Image.Image:
        return decode_image(self.reader.read(sample), self.intake, None).rgb

    def warm(self, samples: Sequence[Sample], advance: Callable[..., None]) -> list[Sample]:
        """The samples whose image decodes, in order; with the semantic branch, every embedding computed."""
        usable: list[Sample] = []
        pending: list[tuple[Sample, np.ndarray]] = []
        for sample in samples:
            try:
                decoded = decode_image(self.reader.read(sample), self.intake, None)
                whole = prepare(decoded, self.whole) if self.whole is not None else None
            except Exception as exc:  # noqa: BLE001 - one unreadable image is skipped, decoders raise many types
                log.warning("train.sample_skipped", sample=sample.id, error=f"{type(exc).__name__}: {exc}")
                advance(1)
                continue
            usable.append(sample)
            if whole is None or sample.id in self.embeddings:
                advance(1)
                continue
            pending.append((sample, whole))
            if len(pending) == EMBED_BATCH:
                self._embed(pending)
                advance(len(pending))
                pending = []
        if pending:
            self._embed(pending)
            advance(len(pending))
        return usable

    def _embed(self, pending: Sequence[tuple[Sample, np.ndarray]]) -> None:
        assert self.encoder is not None
        pixels = torch.from_numpy(np.stack([p for _, p in pending])).to(self.device)
        with torch.inference_mode():
            out = self.encoder(pixels).float().cpu()
        for i, (sample, _) in enumerate(pending):
            self.embeddings[sample.id] = out[i].clone()
        self._added += len(pending)

    def embedding(self, sample: Sample) -> torch.Tensor | None:
        return self.embeddings[sample.id] if self.encoder is not None else None


def class_balanced(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights that give each class half the batch's say. The shared data holds several
    generated images per real one, and the simulator adds more: unweighted, the head learns the prior
    (every real photo scored above 0.5 on the first runs) and a temperature, which cannot move a threshold,
    does not undo it. Mean weight 1, so the loss keeps its scale."""
    n = len(labels)
    fakes = labels.sum()
    if fakes in (0, n):
        return torch.ones_like(labels)
    return torch.where(labels > 0.5, n / (2 * fakes), n / (2 * (n - fakes)))


def embedding_cache(cache_dir: Path, encoder_version: str | None, whole: InputContract | None) -> Path:
    """Where the frozen encoder's embeddings of whole images live between runs: every fold of a leave-one-
    source-out run embeds the same images (a CLIP pass each, the slowest part of a CPU run). Keyed by the
    encoder's version and the whole-image contract; sample ids name files, whose bytes a dataset keeps."""
    key = hashlib.sha256(json.dumps([encoder_version, None if whole is None else asdict(whole)]).encode())
    return cache_dir / f"nirnet-clip-{key.hexdigest()[:16]}.npz"


def _jpeg(crop: np.ndarray, rng: random.Random) -> np.ndarray:
    out = io.BytesIO()
    Image.fromarray(crop).save(out, format="JPEG", quality=rng.randint(65, 95))
    return np.asarray(Image.open(out).convert("RGB"))


def training_crops(image: Image.Image, recipe: NirnetRecipe, rng: random.Random) -> list[np.ndarray]:
    """``recipe.crops`` native (H, W, 3) uint8 crops at random positions, mirror-padded where the image is
    smaller, exactly as the served contract crops (`intake.contract`), randomly flipped."""
    w, h = image.size
    size = recipe.crop_size
    crops = []
    for _ in range(recipe.crops):
        left, top = rng.randint(0, max(w - size, 0)), rng.randint(0, max(h - size, 0))
        crop = crop_pad(image, size, left, top)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop))
    return crops


def _to_pixels(crops: Sequence[np.ndarray]) -> torch.Tensor:
    # The contract's normalisation with mean 0 and std 1: raw [0, 1] pixels, computed as `prepare` does.
    return torch.from_numpy(np.stack(crops).astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


@dataclass
class StepBatch:
    pixels: torch.Tensor
    embeddings: torch.Tensor | None
    labels: torch.Tensor
    simulated: int
    # The simulator's pairs before any JPEG (clean, imprinted), for the Difference-Aware Loss; None when off.
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class StepLoss:
    total: float
    difference: float | None  # the Difference-Aware Loss before its weight, when it is on


def make_batch(samples: Sequence[Sample], inputs: Inputs, recipe: NirnetRecipe,
               simulator: ImprintSimulator | None, epoch: int, step: int) -> StepBatch:
    """One step's crops. Augmentation is class-blind: random crop positions and flips for every crop, and
    JPEG re-encoding at one rate (``jpeg_share``) for real, generated and simulated crops alike. A JPEG
    applied more to one class would be a label by itself (and would erase that class's imprint more than the
    other's): the detector would learn "JPEG = real" (arXiv 2403.17608) instead of the imprint."""
    crops: list[np.ndarray] = []
    embeddings: list[torch.Tensor] = []
    labels: list[float] = []
    to_imprint: list[tuple[np.ndarray, torch.Tensor | None, random.Random]] = []
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None
    for sample in samples:
        rng = random.Random(_seeded("nirnet", recipe.seed, epoch, sample.id))
        embedding = inputs.embedding(sample)
        for crop in training_crops(inputs.image(sample), recipe, rng):
            simulate = simulator is not None and sample.label != FAKE and rng.random() < recipe.simulated_share
            if simulate:
                # The clean crop, imprinted before any JPEG: a generated image is imprinted, then re-encoded.
                to_imprint.append((crop, embedding, rng))
            if rng.random() < recipe.jpeg_share:
                crop = _jpeg(crop, rng)
            crops.append(crop)
            if embedding is not None:
                embeddings.append(embedding)
            labels.append(float(sample.label))
    if to_imprint:
        assert simulator is not None
        generator = torch.Generator().manual_seed(_seeded("nirnet-imprint", recipe.seed, epoch, step))
        imprinted = simulator.imprint(_to_pixels([c for c, _, _ in to_imprint]).double(), generator)
        # Quantised to 8 bits, as every image the detector is served has been.
        as_uint8 = (imprinted * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for fake, (_, embedding, rng) in zip(as_uint8, to_imprint, strict=True):
            crop = np.ascontiguousarray(fake)
            if rng.random() < recipe.jpeg_share:
                crop = _jpeg(crop, rng)
            crops.append(crop)
            if embedding is not None:
                embeddings.append(embedding)  # the real image's: a content-matched pair
            labels.append(1.0)
        if recipe.difference_vae is not None:
            pairs = (_to_pixels([c for c, _, _ in to_imprint]), _to_pixels(list(as_uint8)))
    return StepBatch(_to_pixels(crops), torch.stack(embeddings) if embeddings else None,
                     torch.tensor(labels), len(to_imprint), pairs)


def train_step(model: NIRNet, optimizer: torch.optim.Optimizer, batch: StepBatch, device: str,
               difference: DifferenceAwareLoss | None = None, difference_weight: float = 0.0) -> StepLoss:
    """One optimizer step on ``batch``: the class-balanced loss, plus the weighted Difference-Aware Loss on
    the batch's pairs when ``difference`` is given. Public so the benchmark (`bench/bench_nirnet.py`) times
    the very step the loop takes."""
    logits = model(batch.pixels.to(device), None if batch.embeddings is None else batch.embeddings.to(device))
    labels = batch.labels.to(logits)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=class_balanced(labels))
    aware = None
    if difference is not None and batch.pairs is not None:
        clean, imprinted = batch.pairs
        aware = difference(model.extractor, clean.to(device), imprinted.to(device))
        loss = loss + difference_weight * aware
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return StepLoss(float(loss.detach()), None if aware is None else float(aware.detach()))


# --- scoring as served -------------------------------------------------------------------------------------


def score_samples(model: NIRNet, samples: Sequence[Sample], inputs: Inputs, device: str) -> np.ndarray:
    """One raw logit per image, as the served detector computes it: the contract's crops, each scored with
    the image's CLIP embedding, their logits aggregated by the contract's rule."""
    contract = served_contract(model.config)
    model.eval()
    out = []
    with torch.no_grad():
        for sample in samples:
            decoded = decode_image(inputs.reader.read(sample), inputs.intake, None)
            views = prepare_views(decoded, contract) if contract.multiview else prepare(decoded, contract)[None]
            pixels = torch.from_numpy(views).to(device)
            embedding = inputs.embedding(sample)
            embeddings = None if embedding is None else embedding[None].expand(len(views), -1).to(device)
            logits = model(pixels, embeddings).float().cpu().tolist()
            value = aggregate_logits(logits, contract.aggregate)
            out.append(float("nan") if value is None else value)
    return np.asarray(out, dtype=np.float64)


def _metrics(samples: Sequence[Sample], logits: np.ndarray) -> dict[str, float | None]:
    from streamguard.evaluation.metrics import binary_metrics

    metrics = binary_metrics([s.label for s in samples], sigmoid(logits).tolist())
    return {"auc": metrics.auc, "ap": metrics.ap, "accuracy": metrics.accuracy, "log_loss": metrics.log_loss}


def _grouped(samples: Sequence[Sample], logits: np.ndarray, calibration: Calibration) -> dict[str, Any]:
    from streamguard.evaluation.metrics import grouped_metrics

    return grouped_metrics([s.label for s in samples], [s.generator for s in samples], [s.source for s in samples],
                           calibration.probability(logits).tolist()).as_dict()


def _state(model: NIRNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# --- the run -----------------------------------------------------------------------------------------------


def train_nirnet(settings: Settings, recipe: NirnetRecipe) -> NirnetRun:
    """Read ``recipe.data``, split it as the other trainers do, and train (`train_on_splits`)."""
    from streamguard.evaluation import load_samples

    samples = load_samples(recipe.data, seed=recipe.seed, limit_per_group=recipe.limit_per_group)
    return train_on_splits(settings, recipe, split_samples(samples, recipe.holdout_generators, recipe.holdout_sources))


def train_on_splits(settings: Settings, recipe: NirnetRecipe, splits: Splits) -> NirnetRun:
    """Train on ``splits.train``, stop early and calibrate on ``splits.val``, report ``splits.test`` and score
    ``splits.held_out`` into ``held_out.json``; writes the detector to ``recipe.out``."""
    _check_splits(splits)
    started = time.perf_counter()
    difference = difference_loss(recipe)  # first: a missing VAE fails before minutes of embedding
    encoder = None
    whole = None
    backbone = None
    semantic_dim = 512
    if recipe.semantic:
        from streamguard.backbone import load_backbone
        from streamguard.builtin.nirnet.backend import semantic_contract

        # fp32 as the backend loads it for this branch: one precision, one meaning of the embeddings.
        encoder = load_backbone(settings.backbone, recipe.device, precision="fp32").eval()
        whole, backbone, semantic_dim = semantic_contract(encoder), encoder.version, encoder.embed_dim
    config = recipe.model_config(semantic_dim, backbone)
    checkpoint_dir = recipe.resolved_checkpoint_dir()
    fingerprint = recipe.fingerprint()
    payload = load_checkpoint(checkpoint_dir, fingerprint) if recipe.resume else None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seeded("nirnet-init", recipe.seed))
        model = NIRNet(config)
    model.to(recipe.device)
    trained = [*model.parameters(), *(difference.parameters() if difference is not None else ())]
    optimizer = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=recipe.weight_decay)
    state = LoopState()
    best = _state(model)

    bars = Bars(recipe.progress)
    inputs = Inputs(settings.intake, encoder, whole, recipe.device,
                    embedding_cache(recipe.cache_dir, config.backbone, whole) if encoder is not None else None)
    try:
        with bars.running():
            everything = [*splits.train, *splits.val, *splits.test]
            advance = bars.task("CLIP embeddings" if encoder is not None else "checking images", len(everything))
            usable = {s.id for s in inputs.warm(everything, advance)}
            train = [s for s in splits.train if s.id in usable]
            val = [s for s in splits.val if s.id in usable]
            test = [s for s in splits.test if s.id in usable]
            held_ids = {s.id for s in splits.held_out}
            held = [s for s in test if s.id in held_ids]

            imprints: dict[str, ImprintStats] = {}
            fitted_on: dict[str, Any] = {}
            if recipe.simulator:
                if payload is not None and payload.get("imprints"):
                    # The resumed run's own statistics (not refitted): the same simulator, epoch after epoch.
                    imprints = imprints_from_json(payload["imprints"])
                    fitted_on = json.loads(payload["imprints_fitted_on"])
                else:
                    imprints, fitted_on = fit_imprints(recipe, train, settings.intake)
            simulator = ImprintSimulator(imprints, seed=recipe.seed) if imprints else None
            log.info("nirnet.train_start", backbone=backbone, branches=list(config.branches), train=len(train),
                     val=len(val), test=len(test), held_out=len(held),
                     train_generators=sorted({s.generator for s in train if s.label == FAKE}),
                     train_sources=sorted({s.source for s in train}),
                     simulator=sorted(imprints) if imprints else None, checkpoint=str(checkpoint_dir))

            if payload is not None:
                model.load_state_dict(payload["weights"])
                if difference is not None:
                    difference.load_state_dict(payload["difference"])
                optimizer.load_state_dict(payload["optimizer"])
                state = LoopState(**payload["state"])
                best = payload["best_weights"]
                log.info("train.resumed", checkpoint=str(checkpoint_dir), epochs_done=state.epoch,
                         best_epoch=state.best_epoch, stopped_early=state.stopped_early)

            while state.epoch < recipe.epochs and not state.stopped_early:
                epoch = state.epoch + 1
                order = torch.randperm(len(train), generator=epoch_generator(recipe.seed, epoch)).tolist()
                steps = [order[i:i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
                advance = bars.task(f"nirnet epoch {epoch}/{recipe.epochs}", len(train))
                model.train()
                t0 = time.perf_counter()
                loss_sum, crops_seen, simulated = 0.0, 0, 0
                aware: list[float] = []
                for step, index in enumerate(steps):
                    batch = make_batch([train[i] for i in index], inputs, recipe, simulator, epoch, step)
                    loss = train_step(model, optimizer, batch, recipe.device, difference, recipe.difference_weight)
                    loss_sum += loss.total * len(batch.labels)
                    crops_seen += len(batch.labels)
                    simulated += batch.simulated
                    if loss.difference is not None:
                        aware.append(loss.difference)
                    advance(len(index), info=f"loss {loss.total:.4f}")
                seconds = time.perf_counter() - t0
                val_metrics = _metrics(val, score_samples(model, val, inputs, recipe.device))
                record = {"epoch": epoch, "train_loss": loss_sum / max(crops_seen, 1), "crops": crops_seen,
                          "simulated": simulated, "val": val_metrics, "seconds": round(seconds, 2)}
                if difference is not None:
                    record["difference_loss"] = float(np.mean(aware)) if aware else None
                auc = val_metrics["auc"] if val_metrics["auc"] is not None else -math.inf
                val_loss = val_metrics["log_loss"] if val_metrics["log_loss"] is not None else math.inf
                improved = auc > state.best_auc or (auc == state.best_auc and val_loss < state.best_loss)
                if improved:
                    state.best_epoch, state.best_auc, state.best_loss, state.bad_epochs = epoch, auc, val_loss, 0
                    best = _state(model)
                else:
                    state.bad_epochs += 1
                state.epoch = epoch
                state.history.append(record)
                state.stopped_early = state.bad_epochs >= recipe.patience and epoch < recipe.epochs
                log.info("train.epoch", method=NAME, epoch=epoch, train_loss=round(record["train_loss"], 5),
                         simulated=simulated, val_auc=val_metrics["auc"], val_log_loss=val_metrics["log_loss"],
                         improved=improved, seconds=record["seconds"])
                save_checkpoint(checkpoint_dir, {
                    "state": asdict(state), "weights": _state(model), "optimizer": optimizer.state_dict(),
                    "best_weights": best, "imprints": imprints_to_json(imprints) if imprints else "",
                    "difference": difference.state_dict() if difference is not None else {},
                    "imprints_fitted_on": json.dumps(fitted_on),
                }, fingerprint)
                if state.stopped_early:
                    log.info("train.early_stop", epoch=epoch, best_epoch=state.best_epoch, patience=recipe.patience)

            model.load_state_dict(best)
            val_logits = score_samples(model, val, inputs, recipe.device)
            test_logits = score_samples(model, test, inputs, recipe.device)
    finally:
        inputs.close()
    return _write(recipe, model, imprints, fitted_on, state, train, val, test, held, val_logits, test_logits,
                  time.perf_counter() - started, None if difference is None else difference.vae.name)


def _write(recipe: NirnetRecipe, model: NIRNet, imprints: dict[str, ImprintStats], fitted_on: dict[str, Any],
           state: LoopState,
           train: list[Sample], val: list[Sample], test: list[Sample], held: list[Sample],
           val_logits: np.ndarray, test_logits: np.ndarray, seconds: float, difference_vae: str | None) -> NirnetRun:
    from streamguard.evaluation.calibrate import fit_calibration, quality

    out = recipe.out
    val_labels = [s.label for s in val]
    calibration = fit_calibration(val_logits.tolist(), val_labels, method="temperature",
                                  fitted_on=f"val split of {', '.join(recipe.data)} (seed {recipe.seed})")
    save_model(model.cpu(), out)
    calibration.save(out)
    (out / IMPRINTS_FILE).unlink(missing_ok=True)  # a stale one would pass for this run's
    if imprints:
        from streamguard.training.nirnet.imprint import save_imprints

        save_imprints(out / IMPRINTS_FILE, imprints)
    config = model.config
    residual = sorted({s.residual for s in imprints.values()}) if imprints else []
    report: dict[str, Any] = {
        "method": NAME,
        "version": version(NAME, out),
        "command": recipe.command(),
        "data": list(recipe.data),
        "seed": recipe.seed,
        "branches": list(config.branches),
        "backbone": config.backbone,
        "simulator": {"enabled": bool(imprints), "residual_source": recipe.residual_source if imprints else None,
                      "residuals": residual, "simulated_share": recipe.simulated_share if imprints else 0.0,
                      "sources": {k: v.images for k, v in sorted(imprints.items())}, "fitted_on": fitted_on},
        "difference_loss": ({"vae": difference_vae, "weight": recipe.difference_weight}
                            if difference_vae is not None else None),
        "counts": {"train": len(train), "val": len(val), "test": len(test), "held_out": len(held)},
        "train_groups": {"generators": sorted({s.generator for s in train if s.label == FAKE}),
                         "sources": sorted({s.source for s in train})},
        "holdout": {"generators": list(recipe.holdout_generators), "sources": list(recipe.holdout_sources)},
        "epochs": state.history,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "calibration": {"scale": calibration.scale, "bias": calibration.bias,
                        "val_before": asdict(quality(val_logits.tolist(), val_labels, Calibration())),
                        "val_after": asdict(quality(val_logits.tolist(), val_labels, calibration))},
        "val": _grouped(val, val_logits, calibration),
        "timing": {"total_s": round(seconds, 1)},
    }
    if test:
        report["test"] = _grouped(test, test_logits, calibration)
    if held:
        by_id = {s.id: i for i, s in enumerate(test)}
        held_logits = np.asarray([test_logits[by_id[s.id]] for s in held])
        save_held_out(out, held_out_scores(held, held_logits, calibration), report["holdout"], report["version"])
    else:
        (out / HELD_OUT_FILE).unlink(missing_ok=True)
    meta = {"method": NAME, "version": report["version"], "config": json.loads(config.to_json()),
            "recipe": recipe.fingerprint(), "command": recipe.command(), "data": list(recipe.data),
            "seed": recipe.seed, "branches": list(config.branches), "backbone": config.backbone,
            "residual_source": report["simulator"]["residual_source"], "residuals": residual,
            "difference_loss": report["difference_loss"],
            "imprints": describe_imprints(imprints) if imprints else None,
            "validation": report["val"]["overall"], "best_epoch": state.best_epoch}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    (out / CARD_FILE).write_text(_card(recipe, report, imprints))
    (out / TRAINING_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    log.info("train.done", method=NAME, version=report["version"], best_epoch=state.best_epoch, out=str(out),
             seconds=report["timing"]["total_s"])
    return NirnetRun(out, report)


def _card(recipe: NirnetRecipe, report: dict[str, Any], imprints: dict[str, ImprintStats]) -> str:
    overall = report["val"]["overall"]
    sim = report["simulator"]
    lines = [
        f"# NIRNet `{report['version']}`", "",
        "Noise-imprint extractor with " + ", ".join(report["branches"]) + " branches, scoring "
        f"{recipe.serve_crops} native {recipe.crop_size} px crops (never resized); arXiv 2503.09314.", "",
        f"- Command: `{report['command']}`",
        f"- Data: {', '.join(report['data'])} (seed {report['seed']}); train {report['counts']['train']}, "
        f"val {report['counts']['val']}, test {report['counts']['test']} images",
        f"- Held out: generators {report['holdout']['generators'] or 'none'}, sources "
        f"{report['holdout']['sources'] or 'none'}",
        f"- Semantic backbone: {report['backbone'] or 'none (no semantic branch)'}",
        "- Simulator: " + (f"on, residual source `{sim['residual_source']}` ({', '.join(sim['residuals'])}), "
                            f"{sim['simulated_share']:g} of real crops imprinted per epoch" if sim["enabled"] else "off"),
        "- Difference-Aware Loss: " + (f"on, through `{report['difference_loss']['vae']}`'s encoder, weight "
                                       f"{report['difference_loss']['weight']:g}" if report["difference_loss"] else
                                       "off (it needs a VAE encoder, and none ships or downloads offline: "
                                       "`--difference-vae PATH`)"),
        f"- Best epoch {report['best_epoch']} of {len(report['epochs'])}; validation AUC {overall.get('auc')}, "
        f"log-loss {overall.get('log_loss')}; calibration: temperature, fitted on validation",
        "",
    ]
    if imprints:
        lines += ["## Imprint statistics", "", describe_imprints(imprints)]
    return "\n".join(lines) + "\n"
