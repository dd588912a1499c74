"""The CLIP image encoder, or its trunk, run by ONNX Runtime on the CPU instead of torch.

A graph is exported once to ONNX (the legacy TorchScript exporter, opset 17, dynamic batch, eager attention)
into a cache directory under a name keyed by a digest of the weights the encoder holds at that moment (so an
encoder with adapters merged gets its own file, and changed weights never reuse a stale graph), checked
against torch on seeded pixels (to 1e-4 of the largest output), and run in an ``InferenceSession`` with all
graph optimizations and torch's intra-op thread count. ``OrtEncoder(encoder, cache_dir)`` is the whole encoder
(pixels -> embedding), measured by bench/bench_encoder.py; `streamguard.backends.ort_trunk` the shared trunk
and its detectors' heads, a serving path: it runs them in-process when ``backbone.runtime = "onnxruntime"``.

At ``int8`` (or ``int8-mixed``) ONNX Runtime's dynamic int8 version of that graph runs instead: the block
linears' MatMuls only (attention's activation products and the projection stay float), int8 weights per
output channel in 7 bits (``reduce_range``: on AVX2 without VNNI, ORT's u8 x s8 kernels saturate their pairwise
16-bit sums with full-range weights; on CLIP B/16 that took the embedding's cosine to fp32 from 0.993 down to
0.48), the layers `streamguard.backbone.precision` keeps float at that precision excluded. It is not
checked against torch to a tolerance (it computes something else, by design): bench/bench_encoder.py measures
what it costs (README "int8 encoder on the CPU").
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog
import torch

from streamguard.backbone.cache_files import cache_lock, staged_file
from streamguard.backbone.digest import weights_digest
from streamguard.backbone.errors import BackboneError
from streamguard.backbone.model import ClipImageEncoder
from streamguard.backbone.precision import REFERENCE, keeps_float

log = structlog.get_logger(__name__)
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

OPSET = 17
INPUT = "pixels"
OUTPUT = "embedding"
# How far a graph's outputs may be from torch's, as a fraction of the output's largest magnitude when that is
# above 1: CLIP's hidden states carry outlier channels near 100 (ViT-B/16, blocks 10-12) and float32's summation
# order alone (torch's eager attention against its SDPA) moves them, and the values they feed, by 4e-4.
PARITY_TOLERANCE = 1e-4
# How int8 graphs are quantized; part of their file names, so a change never reuses a stale graph.
QUANT_RECIPE = "s8pc7"
# A block linear's MatMul in the legacy exporter's node names: /model/vision_model/encoder/layers.5/mlp/fc2/MatMul
_BLOCK_MATMUL = re.compile(r"/layers\.(\d+)/((?:self_attn|mlp)/\w+)/MatMul$")
# The same in a detector's head, whose copies of the blocks from its branch point on are ``blocks[i]``
# (`streamguard.builtin.cliphead.model.ClipBranchHead`): /head/blocks.0/mlp/fc2/MatMul
HEAD_BLOCK_MATMUL = re.compile(r"/blocks\.(\d+)/((?:self_attn|mlp)/\w+)/MatMul$")


class OrtMismatch(BackboneError):
    """The exported graph does not compute what the torch encoder does."""


class _Embedding(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).image_embeds


def graph_key(encoder: ClipImageEncoder, graph: str = "clip") -> str:
    """What the exported ``graph`` depends on: the weights as they are now (adapters merged or not), the input
    size, the opset and the torch release that traced it."""
    digest = weights_digest(encoder.model.state_dict())[:16]
    return f"{graph}-{digest}-s{encoder.image_size}-op{OPSET}-torch{torch.__version__.split('+')[0]}"


def eager_copy(encoder: ClipImageEncoder) -> ClipImageEncoder:
    """A float copy of ``encoder`` on the CPU with eager attention, to trace: SDPA traces into shapes the
    exporter freezes. The caller's encoder is untouched."""
    if encoder.precision != REFERENCE:
        raise OrtMismatch(f"export the fp32 encoder, not one at {encoder.precision}")
    return eager_module(encoder)


def eager_module(module: ModuleT) -> ModuleT:
    """`eager_copy` for any float module holding CLIP blocks (a detector's head): the caller's is untouched."""
    copied = copy.deepcopy(module).float().cpu().eval()
    for inner in copied.modules():
        config = getattr(inner, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"
    return copied


def export_graph(module: torch.nn.Module, image_size: int, path: Path, outputs: Sequence[str],
                 input_name: str = INPUT) -> Path:
    """Write ``module`` (pixels (N, 3, S, S) -> ``outputs``, each with the batch first) as ONNX at
    ``image_size``, batch axis dynamic, atomically."""
    return export_module(module, torch.zeros(1, 3, image_size, image_size), path, outputs, input_name)


def export_module(module: torch.nn.Module, sample: torch.Tensor, path: Path, outputs: Sequence[str],
                  input_name: str) -> Path:
    """`export_graph` for an input shaped as ``sample`` (a head's hidden states), its first axis dynamic."""
    with staged_file(path) as tmp, warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, on purpose (no onnxscript)
        torch.onnx.export(module.eval(), (sample,), str(tmp), input_names=[input_name], output_names=list(outputs),
                          dynamic_axes={name: {0: "batch"} for name in (input_name, *outputs)},
                          opset_version=OPSET, dynamo=False)
    return path


def export_encoder(encoder: ClipImageEncoder, path: Path) -> Path:
    """Write ``encoder``'s forward at its own image size as ONNX (batch axis dynamic), atomically."""
    return export_graph(_Embedding(eager_copy(encoder).model), encoder.image_size, path, [OUTPUT])


def parity_pixels(image_size: int) -> torch.Tensor:
    """The seeded batch a graph is checked against torch on."""
    return torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def check_graph(path: Path, pixels: torch.Tensor, expected: Mapping[str, np.ndarray], input_name: str = INPUT) -> None:
    """Refuse (and remove) the graph at ``path`` unless its outputs on ``pixels`` are ``expected`` to
    `PARITY_TOLERANCE`."""
    got = dict(zip(expected, open_session(path).run(list(expected), {input_name: pixels.numpy()}), strict=True))
    for name, want in expected.items():
        scale = max(1.0, float(np.max(np.abs(want))))
        worst = float(np.max(np.abs(got[name] - want))) / scale if got[name].shape == want.shape else float("inf")
        if worst > PARITY_TOLERANCE:
            path.unlink(missing_ok=True)
            raise OrtMismatch(f"{path}: ONNX Runtime differs from torch at {name} by {worst:g} of its largest "
                              f"magnitude (> {PARITY_TOLERANCE:g})")


def check_encoder(encoder: ClipImageEncoder, path: Path) -> None:
    """`check_graph` for the exported forward of ``encoder``."""
    pixels = parity_pixels(encoder.image_size)
    with torch.inference_mode():
        expected = encoder(pixels.to(encoder.model.device)).float().cpu().numpy()
    check_graph(path, pixels, {OUTPUT: expected})


def quantize_graph(source: Path, path: Path, precision: str, num_layers: int, *,
                   pattern: re.Pattern[str] = _BLOCK_MATMUL, first_block: int = 0) -> Path:
    """ONNX Runtime's dynamic int8 of the block linears of ``source`` (per-channel weights), the layers that
    ``precision`` keeps float left out. ``pattern`` finds a block linear's MatMul by node name (groups: the
    block's index in the graph, the layer), ``first_block`` is the encoder's index of the graph's block 0."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    chosen, kept = [], []
    for node in onnx.load(str(source), load_external_data=False).graph.node:
        match = pattern.search(node.name) if node.op_type == "MatMul" else None
        if match is None:
            continue
        block, layer = first_block + int(match[1]), match[2].replace("/", ".")
        (kept if keeps_float(precision, block, layer, num_layers) else chosen).append(node.name)
    if not chosen:
        raise OrtMismatch(f"{source}: no block linear MatMul found to quantize (exporter naming changed?)")
    with staged_file(path) as tmp:
        quantize_dynamic(str(source), str(tmp), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_quantize=chosen)
    log.debug("backbone.ort_quantized", path=str(path), quantized=len(chosen), kept_float=len(kept))
    return path


def cached_graph(cache_dir: Path, key: str, precision: str, num_layers: int, export: Callable[[Path], Any], *,
                 pattern: re.Pattern[str] = _BLOCK_MATMUL, first_block: int = 0) -> Path:
    """The graph ``key`` at ``precision`` in ``cache_dir``, made only when absent: ``export`` writes (and checks)
    the fp32 one, which int8 precisions then quantize (``num_layers``: blocks of the encoder, for the layers the
    precision keeps float; ``pattern``, ``first_block``: as `quantize_graph`). Under a lock per key: workers
    starting together export once."""
    fp32 = cache_dir / f"{key}.fp32.onnx"
    path = fp32 if precision == REFERENCE else cache_dir / f"{key}.{precision}-{QUANT_RECIPE}.onnx"
    if path.is_file():
        return path  # without the lock: a read-only cache (made at an image's build) serves as it is
    with cache_lock(cache_dir, key):
        if not fp32.is_file():
            export(fp32)
            log.info("backbone.ort_exported", path=str(fp32), bytes=fp32.stat().st_size)
        if not path.is_file():
            quantize_graph(fp32, path, precision, num_layers, pattern=pattern, first_block=first_block)
    return path


def open_session(path: Path, threads: int | None = None, *, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session on the graph at ``path``. ``spinning`` False: its threads sleep between
    runs instead of busy-waiting, for sessions that run beside others (heads, each in its runner thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtEncoder:
    """``encoder``'s forward (CLIP-normalized pixels (N, 3, S, S) -> embeddings (N, embed_dim)) in ONNX Runtime.

    ``quantize`` None runs the fp32 graph (checked against torch to ``PARITY_TOLERANCE``); "int8" or "int8-mixed"
    the dynamically quantized one. Only the encoder's own image size: other sizes are refused."""

    def __init__(self, encoder: ClipImageEncoder, cache_dir: Path, *, quantize: str | None = None,
                 threads: int | None = None) -> None:
        if quantize not in (None, "int8", "int8-mixed"):
            raise OrtMismatch(f"unknown ONNX Runtime quantization {quantize!r}: None, int8 or int8-mixed")
        self.image_size = encoder.image_size
        self.embed_dim = encoder.embed_dim
        self.precision = quantize or REFERENCE

        def export(path: Path) -> None:
            export_encoder(encoder, path)
            check_encoder(encoder, path)

        self.path = cached_graph(Path(cache_dir), graph_key(encoder), self.precision,
                                 int(encoder.config.num_hidden_layers), export)
        self.session = open_session(self.path, threads)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected pixels of shape (N, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(pixels.shape)}")
        array = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: array})[0])
