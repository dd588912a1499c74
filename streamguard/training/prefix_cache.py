"""The frozen prefix's output per augmented image, computed once and kept on disk in fp16.

With the last N blocks tuned, the first L - N blocks compute the same thing every epoch: caching their
output turns a CPU training step into N blocks forward and backward instead of L forward and N backward.
An entry is keyed by the backbone version, the number of prefix blocks and the input size (its folder) and
by the sample id and the augmentation key (its file name), so another backbone or recipe never reads it.
The texture scores of the same augmented pixels ride along: MPFT masks by them after the pixels are gone.

fp16 halves the disk (ViT-B/16: 197 x 768 x 2 bytes = 300 KB an image); training reads the rounded
values even on the run that wrote them, so a second run with a warm cache trains on identical inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = 1


@dataclass(frozen=True)
class CachedPrefix:
    hidden: torch.Tensor  # (tokens, hidden) fp16
    texture: torch.Tensor  # (patches,) float32


class PrefixCache:
    def __init__(self, root: Path, backbone_version: str, prefix_blocks: int, size: int) -> None:
        self.directory = Path(root) / "prefix" / f"{backbone_version}-b{prefix_blocks}-s{size}-v{FORMAT}"

    def path(self, sample_id: str, augmentation: str) -> Path:
        digest = hashlib.sha256(json.dumps([sample_id, augmentation]).encode()).hexdigest()[:32]
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def has(self, sample_id: str, augmentation: str) -> bool:
        return self.path(sample_id, augmentation).is_file()

    def get(self, sample_id: str, augmentation: str) -> CachedPrefix | None:
        path = self.path(sample_id, augmentation)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError):
            return None  # a damaged entry is recomputed, not fatal
        return CachedPrefix(tensors["hidden"], tensors["texture"])

    def put(self, sample_id: str, augmentation: str, hidden: torch.Tensor, texture: torch.Tensor) -> CachedPrefix:
        entry = CachedPrefix(hidden.detach().to("cpu", torch.float16).contiguous(),
                             texture.detach().to("cpu", torch.float32).contiguous())
        path = self.path(sample_id, augmentation)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed in: a reader (or a killed run) never sees half a file.
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        os.close(fd)
        try:
            save_file({"hidden": entry.hidden, "texture": entry.texture}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return entry
