"""The precision an encoder's blocks run at (``backbone.precision``): float32, the reference, or dynamic int8.

``int8`` is torch's dynamic quantization of the blocks' linear layers (attention projections and MLP, ~99%
of a ViT's multiply-adds): weights stored as int8 once, activations quantized per batch, int8 matrix
products on the CPU (fbgemm / oneDNN). There is no CUDA kernel for it, so it is refused on any other device.

Only the encoder blocks are quantized, never the embeddings, the layernorms or the projection: a detector
then quantizes exactly the same modules whether it runs whole or as a head on a shared trunk, and the two
give the same scores. LoRA adapters must be merged into a block before it is quantized (``W + s B A`` is
the weight that gets rounded), so those who merge load the encoder in float32 and quantize afterwards.

``int8-mixed`` is int8 with every block's MLP output layer (``mlp.fc2``) left in float32 (`FLOAT_LAYERS`):
torch quantizes a linear's input with one scale for the whole batch tensor, and on CLIP B/16 the fc2 inputs
(after GELU) peak at 20-120x their RMS (93-120x in blocks 5-7), which flattens everything else to a few
levels. Leaving only blocks 5-7's fc2 float kept most of the damage (embedding cosine to fp32 0.95 against
0.96 for all fc2, 0.70 for plain int8, on 16 wild-train images); all of them float is what held the
detectors' AUC (README, "int8 encoder on the CPU"). The rule is fixed per precision name, so a version
suffix (``.int8-mixed``) names exactly one computation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import structlog
import torch

from streamguard.backbone.errors import BackboneError
from streamguard.backbone.model import ClipImageEncoder

log = structlog.get_logger(__name__)

Precision = Literal["fp32", "int8", "int8-mixed"]
REFERENCE: Precision = "fp32"
PRECISIONS: tuple[Precision, ...] = ("fp32", "int8", "int8-mixed")
CPU_ONLY = frozenset({"int8", "int8-mixed"})
# A block's linear layers, by their names inside a CLIP encoder block.
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")

# Which block linears a precision keeps in float32: (block index, layer name, blocks in the encoder) -> keep.
FLOAT_LAYERS: dict[str, Callable[[int, str, int], bool]] = {
    "int8": lambda block, layer, total: False,
    "int8-mixed": lambda block, layer, total: layer == "mlp.fc2",
}


def keeps_float(precision: str, block: int, layer: str, num_layers: int) -> bool:
    """Whether ``precision`` leaves ``layer`` (e.g. ``"mlp.fc2"``) of block ``block`` of ``num_layers`` float."""
    return FLOAT_LAYERS[precision](block, layer, num_layers)


class PrecisionUnsupported(BackboneError):
    """A precision or runtime the device cannot run (int8, or ONNX Runtime, anywhere but the CPU)."""


def check_device(precision: str, device: str | torch.device) -> None:
    """Refuse ``precision`` on ``device`` before anything is loaded."""
    if precision in CPU_ONLY and torch.device(device).type != "cpu":
        raise PrecisionUnsupported(
            f"backbone.precision = \"{precision}\" runs on the CPU only (torch's dynamic int8 quantization has no "
            f"kernels for {torch.device(device).type}); set detectors.device = \"cpu\" or backbone.precision = "
            f"\"fp32\" (on a GPU, serve on Triton with TensorRT fp16 instead)"
        )
    if precision not in PRECISIONS:
        raise PrecisionUnsupported(f"unknown backbone.precision {precision!r}: {', '.join(PRECISIONS)}")


def apply_precision(blocks: Iterable[torch.nn.Module] | Mapping[int, torch.nn.Module], precision: str) -> None:
    """Convert ``blocks`` (encoder blocks, adapters already merged) to ``precision``, in place.

    ``blocks`` are the encoder's last ones, all of them or those from a branch point on: a sequence counts
    from block 0, a mapping gives each block's index (what `FLOAT_LAYERS` rules are written in). Either way
    they run to the encoder's last block, so the encoder has ``max index + 1`` blocks."""
    check_device(precision, "cpu")  # an unknown name is refused even when there is nothing to convert
    if precision == REFERENCE:
        return
    indexed = dict(blocks) if isinstance(blocks, Mapping) else dict(enumerate(blocks))
    for block in indexed.values():
        for param in block.parameters():
            check_device(precision, param.device)
    total = max(indexed, default=-1) + 1
    kept = 0
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 marks eager quantization deprecated (in favour of the torchao package, not a dependency)
        # yet ships and runs it; the warnings would repeat at every load. Revisit when the torch pin moves.
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions", category=UserWarning)
        for index, block in indexed.items():
            # Per output channel: on CLIP B/16 the embedding keeps more of its direction than with one scale per
            # matrix (min cosine to fp32 0.64 against 0.59 on wild-train images), at the same speed. By name, so
            # that the layers the precision keeps float stay the torch.nn.Linear they were.
            names = [name for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)]
            chosen = [name for name in names if not keeps_float(precision, index, name, total)]
            kept += len(names) - len(chosen)
            if chosen:
                # inplace: the block object stays the one its owner holds; only its Linear children are swapped.
                torch.ao.quantization.quantize_dynamic(
                    block, {name: torch.ao.quantization.per_channel_dynamic_qconfig for name in chosen}, inplace=True)
    log.debug("backbone.quantized", precision=precision, blocks=len(indexed), kept_float=kept)


def quantize_encoder(encoder: ClipImageEncoder, precision: str) -> ClipImageEncoder:
    """All of ``encoder``'s blocks to ``precision``, in place (merge adapters first); returns it."""
    if encoder.precision != REFERENCE and precision != encoder.precision:
        raise PrecisionUnsupported(f"the encoder already runs at {encoder.precision}: load it at fp32 to change")
    if precision != encoder.precision:
        apply_precision(encoder.model.vision_model.encoder.layers, precision)
        encoder.precision = precision
    return encoder

