"""The torch side of shared trunks (`streamguard.detectors.trunk`): running a backbone to its branch points,
and running a head on what it gives."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from streamguard.backbone import ClipImageEncoder, vit
from streamguard.backbone.precision import REFERENCE, apply_precision


class EncoderTrunk:
    """What a `LocalTrunk` on a CLIP encoder answers about itself, whatever runs its blocks: subclasses set
    ``_encoder`` (fp32, for heads to copy their blocks from) and ``_precision``."""

    _encoder: ClipImageEncoder
    _precision: str

    @property
    def backbone(self) -> ClipImageEncoder:
        return self._encoder

    @property
    def precision(self) -> str:
        return self._precision

    def resolve(self, branch_block: int | None) -> int:
        return resolve_block(self._encoder, branch_block)


class ClipTrunk(EncoderTrunk):
    """The CLIP image encoder run block by block, keeping the hidden states at the branch points
    (a `streamguard.detectors.trunk.LocalTrunk`).

    At another ``precision`` than fp32 it runs converted copies of the blocks and keeps ``encoder`` as it
    came, for heads to copy their blocks from and merge adapters into: at int8, ViT-B/16's float blocks
    (~340 MB) stay in memory beside the int8 ones (~85 MB)."""

    def __init__(self, encoder: ClipImageEncoder, device: str, precision: str = REFERENCE) -> None:
        self._device = torch.device(device)
        self._encoder = encoder.eval().requires_grad_(False).to(self._device)
        # An encoder already converted (loaded at int8) runs as it is; only heads without adapters fit it.
        self._precision = precision if encoder.precision == REFERENCE else encoder.precision
        self._layers = self._encoder.model.vision_model.encoder.layers
        if self._precision != encoder.precision:
            self._layers = copy.deepcopy(self._layers)
            apply_precision(self._layers, precision)

    def run(self, pixels: Sequence[np.ndarray], blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        return self.forward(torch.from_numpy(np.stack(pixels)).to(self._device), blocks)

    def forward(self, pixels: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """The hidden states entering each of ``blocks`` (ascending) for a (N, 3, H, W) batch on the device."""
        with torch.inference_mode():
            return hidden_states(self._encoder, self._layers, pixels, blocks)

    def close(self) -> None:
        self._encoder.to("cpu")


def resolve_block(encoder: ClipImageEncoder, branch_block: int | None) -> int:
    """The block index a `TrunkSpec.branch_block` means on ``encoder``: None is after its last block."""
    total = vit.num_layers(encoder)
    block = total if branch_block is None else branch_block
    if not 0 <= block <= total:
        raise ValueError(f"branch_block {branch_block} is not a block of this backbone's {total}")
    return block


def hidden_states(encoder: ClipImageEncoder, layers: torch.nn.ModuleList, pixels: torch.Tensor,
                  blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """The hidden states entering each of ``blocks`` (ascending; the number of blocks is after the last one):
    ``encoder``'s tokens through ``layers`` (its blocks, or converted copies of them)."""
    out: dict[int, torch.Tensor] = {}
    hidden = vit.tokens(encoder, pixels)
    done = 0
    for block in blocks:
        hidden = vit.run_layers(layers[done:block], hidden)
        out[block] = hidden
        done = block
    return out


class TorchHead:
    """A head module from hidden states to one logit per image, as a backend runs it."""

    def __init__(self, module: torch.nn.Module, device: str) -> None:
        self._module = module.eval().requires_grad_(False).to(torch.device(device))

    def predict(self, hidden: torch.Tensor) -> list[float | None]:
        with torch.inference_mode():
            out = self._module(hidden)
        return list(out.reshape(hidden.shape[0], -1)[:, 0].float().cpu().tolist())

    def close(self) -> None:
        # Nothing to move: a head shares modules with its trunk (CLIP's pooling), which the trunk releases.
        pass
