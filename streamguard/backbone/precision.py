"""The precision an encoder's blocks run at (``backbone.precision``): float32, the reference, or dynamic int8.

``int8`` is torch's dynamic quantization of the blocks' linear layers (attention projections and MLP, ~99%
of a ViT's multiply-adds): weights stored as int8 once, activations quantized per batch, int8 matrix
products on the CPU (fbgemm / oneDNN). There is no CUDA kernel for it, so it is refused on any other device.

Only the encoder blocks are quantized, never the embeddings, the layernorms or the projection: a detector
then quantizes exactly the same modules whether it runs whole or as a head on a shared trunk, and the two
give the same scores. LoRA adapters must be merged into a block before it is quantized (``W + s B A`` is
the weight that gets rounded), so those who merge load the encoder in float32 and quantize afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Literal

import structlog
import torch

from streamguard.backbone.errors import BackboneError
from streamguard.backbone.model import ClipImageEncoder

log = structlog.get_logger(__name__)

Precision = Literal["fp32", "int8"]
REFERENCE: Precision = "fp32"


class PrecisionUnsupported(BackboneError):
    """A precision the device cannot run (int8 anywhere but the CPU)."""


def check_device(precision: str, device: str | torch.device) -> None:
    """Refuse ``precision`` on ``device`` before anything is loaded."""
    if precision == "int8" and torch.device(device).type != "cpu":
        raise PrecisionUnsupported(
            f"backbone.precision = \"int8\" runs on the CPU only (torch's dynamic int8 quantization has no "
            f"kernels for {torch.device(device).type}); set detectors.device = \"cpu\" or backbone.precision = "
            f"\"fp32\" (on a GPU, serve on Triton with TensorRT fp16 instead)"
        )
    if precision not in ("fp32", "int8"):
        raise PrecisionUnsupported(f"unknown backbone.precision {precision!r}: fp32 or int8")


def apply_precision(blocks: Iterable[torch.nn.Module], precision: str) -> None:
    """Convert ``blocks`` (encoder blocks, adapters already merged) to ``precision``, in place."""
    if precision == REFERENCE:
        return
    blocks = list(blocks)
    for block in blocks:
        for param in block.parameters():
            check_device(precision, param.device)
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 marks eager quantization deprecated (in favour of the torchao package, not a dependency)
        # yet ships and runs it; the warnings would repeat at every load. Revisit when the torch pin moves.
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions", category=UserWarning)
        for block in blocks:
            # inplace: the block object stays the one its owner holds; only its Linear children are swapped.
            # Per output channel: on CLIP B/16 the embedding keeps more of its direction than with one scale per
            # matrix (min cosine to fp32 0.64 against 0.59 on wild-train images), at the same speed.
            torch.ao.quantization.quantize_dynamic(
                block, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True)
    log.debug("backbone.quantized", precision=precision, blocks=len(blocks))


def quantize_encoder(encoder: ClipImageEncoder, precision: str) -> ClipImageEncoder:
    """All of ``encoder``'s blocks to ``precision``, in place (merge adapters first); returns it."""
    if encoder.precision != REFERENCE and precision != encoder.precision:
        raise PrecisionUnsupported(f"the encoder already runs at {encoder.precision}: load it at fp32 to change")
    if precision != encoder.precision:
        apply_precision(encoder.model.vision_model.encoder.layers, precision)
        encoder.precision = precision
    return encoder

