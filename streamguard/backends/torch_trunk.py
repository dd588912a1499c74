"""The torch side of shared trunks (`streamguard.detectors.trunk`): running a backbone to its branch points,
and running a head on what it gives."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from streamguard.backbone import ClipImageEncoder, vit
from streamguard.backbone.precision import REFERENCE, apply_precision
from streamguard.detectors.spec import CLASS_TOKENS, BranchPoint, check_branch_point


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

    def resolve(self, branch_block: BranchPoint | None) -> BranchPoint:
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

    def run(self, pixels: Sequence[np.ndarray], blocks: Sequence[BranchPoint]) -> dict[BranchPoint, torch.Tensor]:
        return self.forward(torch.from_numpy(np.stack(pixels)).to(self._device), blocks)

    def forward(self, pixels: torch.Tensor, blocks: Sequence[BranchPoint]) -> dict[BranchPoint, torch.Tensor]:
        """What each of ``blocks`` (`hidden_states`) receives, for a (N, 3, H, W) batch on the device."""
        with torch.inference_mode():
            return hidden_states(self._encoder, self._layers, pixels, blocks)

    def close(self) -> None:
        self._encoder.to("cpu")


def resolve_block(encoder: ClipImageEncoder, branch_block: BranchPoint | None) -> BranchPoint:
    """The block index a `TrunkSpec.branch_block` means on ``encoder``: None is after its last block;
    `CLASS_TOKENS` stays what it is."""
    check_branch_point(branch_block)
    if branch_block == CLASS_TOKENS:
        return CLASS_TOKENS
    total = vit.num_layers(encoder)
    block = total if branch_block is None else branch_block
    if not 0 <= block <= total:
        raise ValueError(f"branch_block {branch_block} is not a block of this backbone's {total}")
    return block


def hidden_states(encoder: ClipImageEncoder, layers: torch.nn.ModuleList, pixels: torch.Tensor,
                  blocks: Sequence[BranchPoint]) -> dict[BranchPoint, torch.Tensor]:
    """``encoder``'s tokens through ``layers`` (its blocks, or converted copies of them), keyed in the order of
    ``blocks``: for a block index the hidden states entering it (the number of blocks is after the last one),
    for `CLASS_TOKENS` the class token after every block, (N, blocks, hidden), which runs them all."""
    classes = CLASS_TOKENS in blocks
    # With the class tokens asked for, every block runs, and their tokens are gathered on the way.
    stops = sorted({int(b) for b in blocks if b != CLASS_TOKENS} | ({len(layers)} if classes else set()))
    out: dict[BranchPoint, torch.Tensor] = {}
    gathered = []
    hidden = vit.tokens(encoder, pixels)
    done = 0
    for block in stops:
        if classes:
            hidden, tokens = vit.run_layers_with_classes(layers[done:block], hidden)
            gathered.append(tokens)
        else:
            hidden = vit.run_layers(layers[done:block], hidden)
        out[block] = hidden
        done = block
    if classes:
        out[CLASS_TOKENS] = torch.cat(gathered, dim=1)
    return {block: out[block] for block in blocks}


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
