"""The training loop shared by every method: AdamW on the adapters, the head and the method's module;
validation each epoch; early stopping on validation AUC; a checkpoint after each epoch.

Randomness comes from one generator per epoch, seeded by (seed, epoch): the shuffle, MPFT's rho and token
choice and PiN-CLIP's noise. A run resumed after epoch k therefore repeats exactly what the uninterrupted
run would have done from epoch k + 1.

The best epoch is the one with the highest validation AUC; ties go to the lower validation log-loss, so
training still improves the model once a small validation set is perfectly ranked.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from streamguard.detectors.calibration import sigmoid
from streamguard.evaluation.metrics import binary_metrics
from streamguard.training.checkpoint import load_checkpoint, save_checkpoint
from streamguard.training.data import Batch, Entry, Feed
from streamguard.training.model import TunedClip
from streamguard.training.objective import Objective

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    seed: int
    head_lr: float | None = None  # None: lr


@dataclass
class LoopState:
    """Everything the loop decides from, besides weights: plain values, so checkpoints load weights-only."""

    epoch: int = 0  # epochs completed
    best_epoch: int = 0
    best_auc: float = -math.inf
    best_loss: float = math.inf
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class LoopResult:
    state: LoopState
    best_weights: dict[str, dict[str, torch.Tensor]]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.sha256(f"train:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


class Bars:
    """rich progress bars on stderr, or nothing; ``task(name, total)`` returns the advance function."""

    def __init__(self, enabled: bool) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
        )

    @contextmanager
    def running(self) -> Iterator[Bars]:
        with self._progress:
            yield self

    def task(self, name: str, total: int) -> Callable[..., None]:
        task_id = self._progress.add_task(name, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            self._progress.update(task_id, advance=n, **({"info": info} if info is not None else {}))

        return advance


def _tuned_input(model: TunedClip, batch: Batch) -> torch.Tensor:
    """What enters the tuned blocks: the cached prefix output, or the frozen blocks run now."""
    if batch.hidden is not None:
        return batch.hidden
    assert batch.pixels is not None
    return model.prefix(batch.pixels)


def train_step(model: TunedClip, objective: Objective, batch: Batch, optimizer: torch.optim.Optimizer,
               generator: torch.Generator) -> tuple[float, dict[str, float]]:
    """One optimisation step on ``batch``; returns the loss and its parts."""
    keep = objective.keep_tokens(batch.texture, generator)
    features = model.features(_tuned_input(model, batch), keep)
    loss, parts = objective.loss(features, model.head, batch.labels, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), parts


def make_optimizer(model: TunedClip, objective: Objective, lr: float, weight_decay: float,
                   head_lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW; the head gets ``head_lr``: it starts from near zero and must grow to the size of a fitted probe's
    weights, while the adapters must stay small deltas on pretrained weights."""
    head = list(model.head.parameters())
    head_ids = {id(p) for p in head}
    rest = [p for p in [*model.trainable(), *objective.module.parameters()] if id(p) not in head_ids]
    return torch.optim.AdamW([{"params": rest}, {"params": head, "lr": head_lr if head_lr is not None else lr}],
                             lr=lr, weight_decay=weight_decay)


def predict(model: TunedClip, objective: Objective, feed: Feed, entries: Sequence[Entry],
            batch_size: int) -> np.ndarray:
    """Clean logits (no masking, no noise) of ``entries``, in order."""
    model.eval()
    objective.module.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for first in range(0, len(entries), batch_size):
            features = model.features(_tuned_input(model, feed.batch(entries[first : first + batch_size])))
            out.append(model.logits(features).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _validate(model: TunedClip, objective: Objective, feed: Feed, entries: Sequence[Entry],
              batch_size: int) -> dict[str, float | None]:
    logits = predict(model, objective, feed, entries, batch_size)
    metrics = binary_metrics([e.sample.label for e in entries], sigmoid(logits).tolist())
    return {"auc": metrics.auc, "ap": metrics.ap, "accuracy": metrics.accuracy, "log_loss": metrics.log_loss}


def fit(model: TunedClip, objective: Objective, feed: Feed, train: Sequence[Sequence[Entry]],
        val: Sequence[Entry], cfg: LoopConfig, checkpoint_dir: Path, fingerprint: dict[str, Any],
        *, resume: bool = False, bars: Bars | None = None) -> LoopResult:
    """Train for up to ``cfg.epochs``; ``train[v]`` are the entries of augmentation variant v."""
    bars = bars or Bars(False)
    optimizer = make_optimizer(model, objective, cfg.lr, cfg.weight_decay, cfg.head_lr)
    state = LoopState()
    best_weights = model.weights()
    if resume:
        payload = load_checkpoint(checkpoint_dir, fingerprint)
        model.load_weights(payload["weights"])
        objective.module.load_state_dict(payload["objective"])
        optimizer.load_state_dict(payload["optimizer"])
        state = LoopState(**payload["state"])
        best_weights = payload["best_weights"]
        log.info("train.resumed", checkpoint=str(checkpoint_dir), epochs_done=state.epoch,
                 best_epoch=state.best_epoch, stopped_early=state.stopped_early)
    while state.epoch < cfg.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        entries = train[(epoch - 1) % len(train)]
        generator = epoch_generator(cfg.seed, epoch)
        order = torch.randperm(len(entries), generator=generator).tolist()
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        advance = bars.task(f"{objective.name} epoch {epoch}/{cfg.epochs}", len(entries))
        model.train()
        objective.module.train()
        started = time.perf_counter()
        losses: list[float] = []
        parts: dict[str, list[float]] = {}
        for index in batches:
            loss, named = train_step(model, objective, feed.batch([entries[i] for i in index]), optimizer, generator)
            losses.append(loss * len(index))
            for name, value in named.items():
                parts.setdefault(name, []).append(value * len(index))
            advance(len(index), info=f"loss {loss:.4f}")
        seconds = time.perf_counter() - started
        val_metrics = _validate(model, objective, feed, val, cfg.batch_size)
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(np.sum(losses) / len(entries)),
            "train_parts": {k: float(np.sum(v) / len(entries)) for k, v in parts.items()},
            "val": val_metrics,
            "seconds": round(seconds, 2),
            "images_per_s": round(len(entries) / seconds, 2) if seconds > 0 else None,
        }
        auc = val_metrics["auc"] if val_metrics["auc"] is not None else -math.inf
        loss_val = val_metrics["log_loss"] if val_metrics["log_loss"] is not None else math.inf
        improved = auc > state.best_auc or (auc == state.best_auc and loss_val < state.best_loss)
        if improved:
            state.best_epoch, state.best_auc, state.best_loss, state.bad_epochs = epoch, auc, loss_val, 0
            best_weights = model.weights()
        else:
            state.bad_epochs += 1
        state.epoch = epoch
        state.history.append(record)
        state.stopped_early = state.bad_epochs >= cfg.patience and epoch < cfg.epochs
        log.info("train.epoch", method=objective.name, epoch=epoch, train_loss=round(record["train_loss"], 5),
                 val_auc=val_metrics["auc"], val_log_loss=val_metrics["log_loss"], improved=improved,
                 seconds=record["seconds"], images_per_s=record["images_per_s"])
        save_checkpoint(checkpoint_dir, {
            "state": asdict(state),
            "weights": model.weights(),
            "objective": objective.module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "best_weights": best_weights,
        }, fingerprint)
        if state.stopped_early:
            log.info("train.early_stop", epoch=epoch, best_epoch=state.best_epoch, patience=cfg.patience)
    return LoopResult(state, best_weights)
