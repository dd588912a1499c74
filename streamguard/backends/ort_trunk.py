"""The shared CLIP trunk run by ONNX Runtime on the CPU (``backbone.runtime = "onnxruntime"``).

`OrtTrunk` is a `streamguard.detectors.trunk.LocalTrunk` like `ClipTrunk`, and gives what it gives: the
hidden states entering each requested block (embeddings, pre-layernorm, blocks), computed by one ONNX
graph per set of branch points instead of torch. The heads stay torch, built on the fp32 encoder it holds
and converted to its precision as on the torch trunk. The graph is exported into ``<backbone.cache_dir>/
onnx-trunk`` (`streamguard.backbone.onnx_runtime`: keyed by the weights, the image size, the branch points,
opset and torch release, and the int8 recipe), checked against torch's trunk at fp32, and
quantized by ONNX Runtime at int8 / int8-mixed with the layers that precision keeps float left out.
A ViT-B/16 graph is ~350 MB at fp32 (~175 MB at int8-mixed): a cache, never the repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamguard.backbone import ClipImageEncoder, vit
from streamguard.backbone.onnx_runtime import (
    INPUT,
    cached_graph,
    check_graph,
    eager_copy,
    export_graph,
    graph_key,
    open_session,
    parity_pixels,
)
from streamguard.backbone.precision import REFERENCE, PrecisionUnsupported, check_device
from streamguard.backends.torch_trunk import EncoderTrunk, hidden_states

CACHE_NAME = "onnx-trunk"


def cache_dir(backbone_cache: Path) -> Path:
    """Where the trunk graphs of a backbone cached in ``backbone_cache`` (``backbone.cache_dir``) go."""
    return Path(backbone_cache).expanduser() / CACHE_NAME


def check_cpu(device: str | torch.device) -> None:
    """Refuse ONNX Runtime on another device than the CPU, before anything is loaded."""
    if torch.device(device).type != "cpu":
        raise PrecisionUnsupported(
            "backbone.runtime = \"onnxruntime\" runs on the CPU only (the trunk graph runs on ONNX Runtime's CPU "
            f"execution provider), not on {torch.device(device).type}; set detectors.device = \"cpu\" or "
            "backbone.runtime = \"torch\"")


def _output(block: int) -> str:
    return f"hidden{block}"


def export_trunk(encoder: ClipImageEncoder, blocks: Sequence[int], path: Path, outputs: Sequence[str],
                 input_name: str = INPUT, image_size: int | None = None) -> Path:
    """Write the trunk of fp32 ``encoder`` to ``blocks`` as ONNX (``outputs``: one name per block, in order) for
    pixels of ``image_size`` (default: the encoder's own), and refuse it unless ONNX Runtime computes torch's
    hidden states on it. The Triton build writes its trunk model with it, under Triton's tensor names."""
    size = image_size or encoder.image_size
    export_graph(_TrunkGraph(eager_copy(encoder), blocks), size, path, outputs, input_name)
    pixels = parity_pixels(size)
    with torch.inference_mode():
        expected = hidden_states(encoder, encoder.model.vision_model.encoder.layers, pixels, blocks)
    check_graph(path, pixels, {name: hidden.numpy() for name, hidden in zip(outputs, expected.values(), strict=True)},
                input_name)
    return path


class _TrunkGraph(torch.nn.Module):
    """What the graph computes: `hidden_states` at ``blocks``, in their order."""

    def __init__(self, encoder: ClipImageEncoder, blocks: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.blocks = tuple(blocks)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.encoder.model.vision_model.encoder.layers
        return tuple(hidden_states(self.encoder, layers, pixels, self.blocks).values())


class OrtTrunk(EncoderTrunk):
    """``encoder``'s trunk in ONNX Runtime, its graph for a set of branch points made at the first `prepare` or
    `run` for them. ``encoder`` stays fp32 and untouched: heads copy their blocks from it."""

    def __init__(self, encoder: ClipImageEncoder, cache_dir: Path, precision: str = REFERENCE) -> None:
        check_device(precision, "cpu")  # an unknown precision is refused before any export
        if encoder.precision != REFERENCE:
            raise PrecisionUnsupported(f"ONNX Runtime exports the fp32 encoder, this one runs at {encoder.precision}")
        self._encoder = encoder.eval().requires_grad_(False).to("cpu")
        self._cache_dir = Path(cache_dir)
        self._precision = precision
        self._key = graph_key(encoder, "trunk")  # hashes the weights: once, not per set of branch points
        self._sessions: dict[tuple[int, ...], Any] = {}

    def prepare(self, blocks: Sequence[int]) -> None:
        """Export (first time) and load the graph for ``blocks``: at start-up, not in a first batch's timeout."""
        self._session(tuple(blocks))

    def run(self, pixels: Sequence[np.ndarray], blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """The hidden states entering each of ``blocks`` (ascending) for one batch, on the CPU."""
        size = self._encoder.image_size
        array = np.ascontiguousarray(np.stack(pixels), dtype=np.float32)
        if array.shape[1:] != (3, size, size):
            raise ValueError(f"the ONNX Runtime trunk takes pixels of shape (3, {size}, {size}), "
                             f"got {array.shape[1:]}")
        key = tuple(blocks)
        outputs = self._session(key).run([_output(block) for block in key], {INPUT: array})
        return {block: torch.from_numpy(out) for block, out in zip(key, outputs, strict=True)}

    def close(self) -> None:
        self._sessions.clear()

    def _session(self, blocks: tuple[int, ...]) -> Any:
        session = self._sessions.get(blocks)
        if session is None:
            key = f"{self._key}-b{'-'.join(map(str, blocks))}"
            path = cached_graph(self._cache_dir, key, self._precision, vit.num_layers(self._encoder),
                                lambda fp32: self._export(blocks, fp32))
            session = self._sessions[blocks] = open_session(path)
        return session

    def _export(self, blocks: tuple[int, ...], path: Path) -> None:
        export_trunk(self._encoder, blocks, path, [_output(block) for block in blocks])
