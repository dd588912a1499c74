"""What a NIRNet weights directory holds, without torch: the model's config, file names, digest and version.

A directory holds ``nirnet.safetensors`` (the whole model's state), ``config.json`` (the `NirnetConfig` it
was built with) and, once fitted, ``calibration.json``. The plugin registers from these alone, so a worker
that never loads the model in-process needs no torch to know its version and input contract.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

WEIGHTS_FILE = "nirnet.safetensors"
CONFIG_FILE = "config.json"
# Bump when the served model's structure or preprocessing changes without its files changing.
VERSION_PREFIX = 1
BRANCHES = ("noise", "frequency", "semantic")


@dataclass(frozen=True)
class NirnetConfig:
    """The sizes of a NIRNet and the input it was trained on.

    ``crop_size``/``crops``: the native crops it scores (the frequency branch sees spectra of this fixed
    size). ``branches``: the enabled subset of `BRANCHES`; ablations are this field. ``semantic_dim``: the
    width of the CLIP image embedding the semantic branch reads, and ``backbone`` the CLIP weights' version
    it was trained on (`ClipImageEncoder.version`): its head means nothing on another encoder's embeddings.
    """

    crop_size: int = 256
    crops: int = 4
    aggregate: Literal["mean", "trimmed-mean"] = "mean"
    extractor_depth: int = 8
    extractor_width: int = 32
    branch_width: int = 32
    feature_dim: int = 64
    spectrum_grid: int = 8
    semantic_dim: int = 512
    hidden_dim: int = 64
    norm: Literal["batch", "group"] = "batch"
    branches: tuple[str, ...] = BRANCHES
    backbone: str | None = None

    def __post_init__(self) -> None:
        if not self.branches or any(b not in BRANCHES for b in self.branches):
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, not {self.branches!r}")
        if len(set(self.branches)) != len(self.branches):
            raise ValueError(f"branches repeats a branch: {self.branches!r}")
        if self.norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', not {self.norm!r}")
        if min(self.crop_size, self.crops, self.extractor_depth, self.extractor_width, self.branch_width,
               self.feature_dim, self.spectrum_grid, self.semantic_dim, self.hidden_dim) < 1:
            raise ValueError("sizes, depth and counts must be positive")

    @property
    def semantic(self) -> bool:
        return "semantic" in self.branches

    def to_json(self) -> str:
        # Sorted and fixed-format: the text is part of the version digest, so equal configs must hash equal.
        return json.dumps(asdict(self), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> NirnetConfig:
        raw: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            # A config from a newer model: serving it with fields dropped would score a different model.
            raise ValueError(f"unknown NIRNet config fields {unknown}")
        if "branches" in raw:
            raw["branches"] = tuple(raw["branches"])
        return cls(**raw)


def read_config(directory: Path) -> NirnetConfig:
    return NirnetConfig.from_json((directory / CONFIG_FILE).read_text())


def has_weights(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file() and (directory / CONFIG_FILE).is_file()


def weights_digest(directory: Path) -> str:
    """Changes whenever the weights or the config change: part of the version, hence of dedupe keys."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        data = (directory / name).read_bytes()
        h.update(len(data).to_bytes(8, "little"))  # no two file pairs concatenate to the same bytes
        h.update(data)
    return h.hexdigest()[:10]


def version(name: str, directory: Path) -> str:
    return f"{name}-{VERSION_PREFIX}+{weights_digest(directory)}"
