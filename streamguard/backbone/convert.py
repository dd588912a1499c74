"""Turn a dynamically int8-quantized ONNX export of a CLIP image tower back into float32 tensors named as
transformers' ``CLIPVisionModelWithProjection`` names them, and verify the result.

What the export looks like (torch's ONNX exporter, then ``onnxruntime.quantization.quantize_dynamic``):

- Tensors that stayed float keep their transformers names as initializers
  (``vision_model.embeddings.*``, layer norms, every Linear's ``bias``). The exporter may deduplicate equal
  initializers; the duplicates then survive as ``Identity`` nodes whose *output* carries the original name,
  so those outputs count as named tensors too.
- Every Linear weight was exported as an anonymous ``onnx::MatMul_<n>`` initializer of shape [in, out]
  (the transpose of torch's [out, in]) and then quantized into ``<anon>_quantized`` (int8 or uint8),
  ``<anon>_scale`` and ``<anon>_zero_point`` (one value per output column, or one for the whole tensor).
  Its numeric name says nothing reliable about which layer it belongs to, so names are found by tracing.

The tracing, per quantized weight:

1. Start at the ``MatMulInteger`` node whose second input (B) is the quantized initializer; its fourth
   input is B's zero point.
2. Walk forward from its output through the dequantizing chain, one consumer at a time, across ``Cast``,
   ``Mul`` and ``Identity`` only: ``MatMulInteger -> Cast(int32 -> float) -> Mul(by a_scale * b_scale)``.
   The ``Mul``'s other operand is produced by a ``Mul(activation_scale, b_scale)``; its initializer input
   is B's scale.
3. If the walk reaches an ``Add`` whose other operand is a named tensor ``<prefix>.bias``, the weight is
   ``<prefix>.weight``: this is how q/k/v/out projections and fc1/fc2 of every layer get their names,
   whatever order the exporter numbered them in.
4. A weight whose chain ends without such an ``Add`` (the walk reaches a graph output, a fan-out or any
   other op) belongs to a Linear without bias. The model's bias-less Linears are listed from the module
   tree (in CLIP only ``visual_projection``) and each such weight is matched to the one of them with its
   shape; zero or several candidates is an error rather than a guess.

A weight the quantizer left float (B of a plain ``MatMul``) is traced the same way, starting at that node,
and only transposed; an export that was never quantized therefore converts too.

Dequantized weight = (q - zero_point) * scale, per output column, transposed to [out, in].

The mapping is then checked as a whole: every tensor the model expects is present exactly once with its
shape, nothing is mapped twice, and ``load_state_dict(strict=True)`` accepts it. For the shipped file the
tensor count and a content checksum are pinned too (``Expectations``), so a changed upstream file is
caught at set-up rather than showing up as worse detections.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import structlog
import torch
from onnx import numpy_helper
from transformers import CLIPVisionConfig

from streamguard.backbone.arch import build_model, expected_shapes, unbiased_linear_names
from streamguard.backbone.digest import weights_digest
from streamguard.backbone.errors import ConversionError

log = structlog.get_logger(__name__)

# Ops the walk from MatMulInteger to the bias Add may cross: the dequantizing chain and exporter aliases.
_CHAIN_OPS = frozenset({"Cast", "Mul", "Identity"})
_MAX_CHAIN = 8
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


@dataclass(frozen=True)
class Expectations:
    """What a converted file must satisfy beyond "loads strictly into the model of its config"."""

    tensor_count: int | None = None
    weights_sha256: str | None = None


ANY_WEIGHTS = Expectations()


class _Graph:
    """Initializers, aliases and producer/consumer links of one ONNX graph."""

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

    def source_initializer(self, name: str) -> str | None:
        """The initializer a value is, directly or through a chain of Identity nodes; None if computed."""
        seen = 0
        while name not in self.initializers:
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity" or seen > _MAX_CHAIN:
                return None
            name, seen = node.input[0], seen + 1
        return name

    def named_tensors(self) -> dict[str, str]:
        """Every name that holds a constant tensor (initializers and Identity aliases) -> its initializer."""
        names = {name: name for name in self.initializers}
        for node in self.graph.node:
            if node.op_type == "Identity" and (source := self.source_initializer(node.input[0])) is not None:
                names[node.output[0]] = source
        return names

    def array(self, initializer: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[initializer])


@dataclass(frozen=True)
class _MatMulWeight:
    """A Linear weight as the export holds it: B of a MatMul, [in, out]."""

    weight: str  # the initializer (int8/uint8 when quantized)
    scale: str | None  # None: a weight the quantizer left float, taken as is
    zero_point: str | None
    bias_name: str | None


def convert_onnx(onnx_path: Path, config: CLIPVisionConfig) -> dict[str, torch.Tensor]:
    """Float32 transformers-named tensors of the CLIP image tower in an int8-quantized ONNX file.

    Raises ``ConversionError`` when a tensor the model needs cannot be found or named unambiguously.
    """
    graph = _Graph(onnx.load(str(onnx_path)).graph)
    shapes = expected_shapes(config)
    named = graph.named_tensors()
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    for name, source in named.items():
        if name in shapes and graph.initializers[source].data_type in _FLOAT_TYPES:
            state[name] = torch.from_numpy(graph.array(source).astype(np.float32))
            used.add(source)

    weights = _matmul_weights(graph, named)
    unbiased: list[tuple[_MatMulWeight, torch.Tensor]] = []
    for weight in weights:
        tensor = _dequantize(graph, weight)
        used.update(name for name in (weight.weight, weight.scale, weight.zero_point) if name is not None)
        if weight.bias_name is None:
            unbiased.append((weight, tensor))
            continue
        target = weight.bias_name.removesuffix(".bias") + ".weight"
        if len(shapes.get(target, ())) != 2:
            raise ConversionError(f"{weight.weight} traces to {weight.bias_name}, which is not the bias of a Linear")
        _put(state, target, tensor, weight.weight)

    candidates = [n for n in unbiased_linear_names(config) if n not in state]
    for weight, tensor in unbiased:
        matches = [n for n in candidates if shapes[n] == tuple(tensor.shape)]
        if len(matches) != 1:
            raise ConversionError(
                f"{weight.weight} (shape {tuple(tensor.shape)}) has no bias to trace and matches "
                f"{len(matches)} bias-less Linear layers of the model: {matches}"
            )
        _put(state, matches[0], tensor, weight.weight)
        candidates.remove(matches[0])

    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ConversionError(f"{len(missing)} tensors not found in {onnx_path.name}: {missing[:8]}")
    unused = sorted(set(graph.initializers) - used)
    quantized = sum(1 for weight in weights if weight.scale is not None)
    log.info("backbone.onnx_converted", tensors=len(state), quantized=quantized, unused_initializers=unused[:8])
    return state


def _put(state: dict[str, torch.Tensor], name: str, tensor: torch.Tensor, origin: str) -> None:
    if name in state:
        raise ConversionError(f"{origin} traces to {name}, which another tensor already provides")
    state[name] = tensor


def _matmul_weights(graph: _Graph, named: Mapping[str, str]) -> list[_MatMulWeight]:
    weights = []
    for node in graph.graph.node:
        label = node.name or node.output[0]
        if node.op_type == "MatMulInteger" and node.input[1] in graph.initializers:
            if len(node.input) < 4 or node.input[3] not in graph.initializers:
                raise ConversionError(f"{label}: quantized weight without a zero point")
            scale, bias = _follow_chain(graph, node, named, quantized=True)
            if scale is None:
                raise ConversionError(f"{label}: no weight scale found after MatMulInteger")
            weights.append(_MatMulWeight(node.input[1], scale, node.input[3], bias))
        elif node.op_type == "MatMul" and (source := graph.source_initializer(node.input[1])) is not None:
            # A weight the quantizer skipped (excluded node, too small): same tracing, no dequantization.
            _, bias = _follow_chain(graph, node, named, quantized=False)
            weights.append(_MatMulWeight(source, None, None, bias))
    return weights


def _follow_chain(
    graph: _Graph, matmul: onnx.NodeProto, named: Mapping[str, str], *, quantized: bool
) -> tuple[str | None, str | None]:
    """(weight scale initializer, bias name), either None if not found, walking forward from a MatMul."""
    scale: str | None = None
    current = matmul.output[0]
    for _ in range(_MAX_CHAIN):
        consumers = graph.consumers.get(current, [])
        if len(consumers) != 1:
            break
        node = consumers[0]
        other = next((name for name in node.input if name != current), None)
        if node.op_type == "Add":
            if other is not None and other in named and other.endswith(".bias"):
                return scale, other
            break
        if node.op_type not in _CHAIN_OPS:
            break
        if quantized and node.op_type == "Mul" and scale is None and other is not None:
            scale = _weight_scale(graph, other, matmul)
        current = node.output[0]
    return scale, None


def _weight_scale(graph: _Graph, multiplier: str, matmul: onnx.NodeProto) -> str | None:
    """B's scale: the initializer input of the ``Mul(a_scale, b_scale)`` producing the multiplier."""
    if multiplier in graph.initializers:
        # Quantizers may fold a_scale * b_scale when a_scale is static; then B's scale is not separable.
        raise ConversionError(f"{matmul.name or matmul.output[0]}: folded scale; expected dynamic quantization")
    producer = graph.producer.get(multiplier)
    if producer is None or producer.op_type != "Mul":
        return None
    return next((name for name in producer.input if name in graph.initializers), None)


def _dequantize(graph: _Graph, weight: _MatMulWeight) -> torch.Tensor:
    """(q - zero_point) * scale over each output column, as a torch [out, in] float32 tensor."""
    q = graph.array(weight.weight).astype(np.float32)
    if q.ndim != 2:
        raise ConversionError(f"{weight.weight}: expected a 2-D MatMul weight, got shape {q.shape}")
    if weight.scale is None or weight.zero_point is None:
        return torch.from_numpy(np.ascontiguousarray(q.T))
    scale = graph.array(weight.scale).astype(np.float32).reshape(-1)
    zero_point = graph.array(weight.zero_point).astype(np.float32).reshape(-1)
    out = q.shape[1]
    for label, values in (("scale", scale), ("zero point", zero_point)):
        if values.size not in (1, out):
            raise ConversionError(f"{weight.weight}: {label} has {values.size} values for {out} output columns")
    dense = (q - zero_point) * scale  # broadcasts over the [in, out] layout's last axis
    return torch.from_numpy(np.ascontiguousarray(dense.T))


def verify_weights(
    state: Mapping[str, torch.Tensor], config: CLIPVisionConfig, expect: Expectations = ANY_WEIGHTS
) -> str:
    """Check the converted tensors against the model of ``config``; returns their content digest."""
    shapes = expected_shapes(config)
    if expect.tensor_count is not None and len(state) != expect.tensor_count:
        raise ConversionError(f"{len(state)} tensors, expected {expect.tensor_count}")
    extra, missing = sorted(set(state) - set(shapes)), sorted(set(shapes) - set(state))
    if extra or missing:
        raise ConversionError(f"tensor names differ from the model: extra {extra[:8]}, missing {missing[:8]}")
    wrong = {n: (tuple(t.shape), shapes[n]) for n, t in state.items() if tuple(t.shape) != shapes[n]}
    if wrong:
        raise ConversionError(f"tensor shapes differ from the model (got, expected): {dict(list(wrong.items())[:8])}")
    non_float = sorted(n for n, t in state.items() if t.dtype != torch.float32)
    if non_float:
        raise ConversionError(f"tensors not float32: {non_float[:8]}")
    try:
        build_model(config, state)
    except RuntimeError as exc:
        raise ConversionError(f"strict load into CLIPVisionModelWithProjection failed: {exc}") from exc
    digest = weights_digest(state)
    if expect.weights_sha256 is not None and digest != expect.weights_sha256:
        raise ConversionError(
            f"converted weights have checksum {digest}, expected {expect.weights_sha256}: "
            "the upstream file changed, or the conversion did"
        )
    log.info("backbone.weights_verified", tensors=len(state), weights_sha256=digest)
    return digest
