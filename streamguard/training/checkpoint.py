"""The training loop's state on disk, written after every epoch, so ``--resume`` continues a killed run.

One file, ``last.pt``, replaced atomically: the epochs done, the early-stopping bookkeeping and history, the
weights being trained (adapters, head, the method's own module), the optimizer, and the best weights so
far. The recipe's fingerprint travels with it: resuming under another recipe (other data, seed, mode...)
is refused rather than silently mixing two runs. Loaded with ``weights_only``: tensors and plain values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "last.pt"


class CheckpointMismatch(ValueError):
    """A checkpoint written under another recipe."""


def checkpoint_path(directory: Path) -> Path:
    return directory / CHECKPOINT_FILE


def save_checkpoint(directory: Path, payload: dict[str, Any], fingerprint: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory)
    # Written beside and renamed in: a run killed mid-write leaves the previous epoch's checkpoint intact.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({**payload, "fingerprint": json.dumps(fingerprint, sort_keys=True)}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(directory: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    path = checkpoint_path(directory)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(payload.pop("fingerprint"))
    wanted = json.loads(json.dumps(fingerprint, sort_keys=True))
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise CheckpointMismatch(f"--resume: the checkpoint at {path} was written by another recipe "
                                 f"(differs in {', '.join(changed)}); start afresh without --resume")
    return payload


def resumable(directory: Path, fingerprint: dict[str, Any]) -> bool:
    """Whether ``directory`` holds a checkpoint this recipe may resume: one written under another recipe is
    not (a caller that resumes whenever it can then starts that run afresh instead of failing)."""
    try:
        load_checkpoint(directory, fingerprint)
    except (FileNotFoundError, CheckpointMismatch):
        return False
    return True
