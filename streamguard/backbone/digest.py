"""Checksums: of a file, and of a state dict's content.

The content digest hashes names, dtypes, shapes and raw bytes in name order, so it does not depend on how
or in which container the tensors were serialised: the same weights have the same digest whether they come
from the cache, a transformers directory or an OpenAI state dict. The backbone's ``version`` derives from it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch


def file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)])
        h.update(header.encode() + b"\0")
        # A flat uint8 view exposes the raw bytes without a copy, whatever the dtype (bfloat16 has no numpy one).
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
