"""The CLIP image encoder (pixels -> embedding) run by ONNX Runtime on the CPU instead of torch.

``OrtEncoder(encoder, cache_dir)`` exports the encoder's forward once to ONNX (the legacy TorchScript exporter,
opset 17, dynamic batch, eager attention), into ``cache_dir`` under a name keyed by a digest of the weights it
holds at that moment (so an encoder with adapters merged gets its own file, and changed weights never reuse a
stale graph), checks ONNX Runtime against torch on seeded pixels, and runs it in an ``InferenceSession`` with
all graph optimizations and torch's intra-op thread count.

``quantize="int8"`` (or ``"int8-mixed"``) also writes ONNX Runtime's dynamic int8 version of that graph: the
block linears' MatMuls only (attention's activation products and the projection stay float), int8 weights per
output channel in 7 bits (``reduce_range``: on AVX2 without VNNI, ORT's u8 x s8 kernels saturate their pairwise
16-bit sums with full-range weights; on CLIP B/16 that took the embedding's cosine to fp32 from 0.993 down to
0.48), the layers `streamguard.backbone.precision` keeps float at that precision excluded. It is not
checked against torch to a tolerance (it computes something else, by design): bench/bench_encoder.py measures
what it costs.

A measured variant, not a serving path: see README "int8 encoder on the CPU" for the numbers.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import structlog
import torch

from streamguard.backbone.digest import weights_digest
from streamguard.backbone.errors import BackboneError
from streamguard.backbone.model import ClipImageEncoder
from streamguard.backbone.precision import REFERENCE, keeps_float

log = structlog.get_logger(__name__)

OPSET = 17
INPUT = "pixels"
OUTPUT = "embedding"
PARITY_ATOL = 1e-4
# How int8 graphs are quantized; part of their file names, so a change never reuses a stale graph.
QUANT_RECIPE = "s8pc7"
# A block linear's MatMul in the legacy exporter's node names: /model/vision_model/encoder/layers.5/mlp/fc2/MatMul
_BLOCK_MATMUL = re.compile(r"/layers\.(\d+)/((?:self_attn|mlp)/\w+)/MatMul$")


class OrtMismatch(BackboneError):
    """The exported graph does not compute what the torch encoder does."""


class _Embedding(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).image_embeds


def graph_key(encoder: ClipImageEncoder) -> str:
    """What the exported graph depends on: the weights as they are now (adapters merged or not), the input
    size, the opset and the torch release that traced it."""
    digest = weights_digest(encoder.model.state_dict())[:16]
    return f"clip-{digest}-s{encoder.image_size}-op{OPSET}-torch{torch.__version__.split('+')[0]}"


def export_encoder(encoder: ClipImageEncoder, path: Path) -> Path:
    """Write ``encoder``'s forward at its own image size as ONNX (batch axis dynamic), atomically."""
    if encoder.precision != REFERENCE:
        raise OrtMismatch(f"export the fp32 encoder, not one at {encoder.precision}")
    # A copy with eager attention: SDPA traces into shapes the exporter freezes; the caller's encoder is untouched.
    model = copy.deepcopy(encoder.model).float().cpu().eval()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"
    wrapped = _Embedding(model).eval()
    sample = torch.zeros(1, 3, encoder.image_size, encoder.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, on purpose (no onnxscript)
            torch.onnx.export(wrapped, (sample,), tmp, input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=OPSET,
                              dynamo=False)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the cache unreadable to another service user
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def quantize_graph(source: Path, path: Path, precision: str, num_layers: int) -> Path:
    """ONNX Runtime's dynamic int8 of the block linears of ``source`` (per-channel weights), the layers that
    ``precision`` keeps float left out."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    chosen, kept = [], []
    for node in onnx.load(str(source), load_external_data=False).graph.node:
        match = _BLOCK_MATMUL.search(node.name) if node.op_type == "MatMul" else None
        if match is None:
            continue
        block, layer = int(match[1]), match[2].replace("/", ".")
        (kept if keeps_float(precision, block, layer, num_layers) else chosen).append(node.name)
    if not chosen:
        raise OrtMismatch(f"{source}: no block linear MatMul found to quantize (exporter naming changed?)")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        quantize_dynamic(str(source), tmp, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_quantize=chosen)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.debug("backbone.ort_quantized", path=str(path), quantized=len(chosen), kept_float=len(kept))
    return path


class OrtEncoder:
    """``encoder``'s forward (CLIP-normalized pixels (N, 3, S, S) -> embeddings (N, embed_dim)) in ONNX Runtime.

    ``quantize`` None runs the fp32 graph (checked against torch to ``PARITY_ATOL``); "int8" or "int8-mixed"
    the dynamically quantized one. Only the encoder's own image size: other sizes are refused."""

    def __init__(self, encoder: ClipImageEncoder, cache_dir: Path, *, quantize: str | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        if quantize not in (None, "int8", "int8-mixed"):
            raise OrtMismatch(f"unknown ONNX Runtime quantization {quantize!r}: None, int8 or int8-mixed")
        self.image_size = encoder.image_size
        self.embed_dim = encoder.embed_dim
        key = graph_key(encoder)
        fp32 = Path(cache_dir) / f"{key}.fp32.onnx"
        if not fp32.is_file():
            export_encoder(encoder, fp32)
            self._check(encoder, fp32, ort)
            log.info("backbone.ort_exported", path=str(fp32), bytes=fp32.stat().st_size)
        self.path = fp32
        if quantize is not None:
            self.path = Path(cache_dir) / f"{key}.{quantize}-{QUANT_RECIPE}.onnx"
            if not self.path.is_file():
                quantize_graph(fp32, self.path, quantize, int(encoder.config.num_hidden_layers))
        self.precision = quantize or REFERENCE
        self.session = ort.InferenceSession(str(self.path), _options(ort, threads), providers=["CPUExecutionProvider"])

    @staticmethod
    def _check(encoder: ClipImageEncoder, path: Path, ort: object) -> None:
        pixels = torch.randn(2, 3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = encoder(pixels.to(encoder.model.device)).float().cpu().numpy()
        session = ort.InferenceSession(str(path), _options(ort, None), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
        got = session.run([OUTPUT], {INPUT: pixels.numpy()})[0]
        worst = float(np.max(np.abs(got - expected)))
        if got.shape != expected.shape or worst > PARITY_ATOL:
            path.unlink(missing_ok=True)
            raise OrtMismatch(f"{path}: ONNX Runtime differs from torch by {worst:g} (> {PARITY_ATOL:g})")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected pixels of shape (N, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(pixels.shape)}")
        array = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: array})[0])


def _options(ort: object, threads: int | None) -> object:
    options = ort.SessionOptions()  # type: ignore[attr-defined]
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # type: ignore[attr-defined]
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # type: ignore[attr-defined]
    return options
