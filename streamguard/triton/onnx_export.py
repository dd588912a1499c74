"""Export a detector's torch model to ONNX for Triton's ONNX Runtime / TensorRT path.

The legacy TorchScript-based exporter is used on purpose: it needs no extra packages and handles the
CLIP encoder (eager attention) on every torch release we support; the graph is checked by running it in
ONNX Runtime against the torch model before the file is accepted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog
import torch

log = structlog.get_logger(__name__)

OPSET = 17


class ExportMismatch(RuntimeError):
    """The exported graph does not compute what the torch model does."""


def _eager_attention(model: torch.nn.Module) -> None:
    # SDPA kernels trace into shapes some exporters freeze; eager attention is plain matmuls and softmax.
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"


def export_onnx(model: torch.nn.Module, path: Path, input_shape: Sequence[int], *, input_name: str = "PIXELS",
                output_name: str = "LOGITS", atol: float = 1e-3, seed: int = 0) -> Path:
    """Write ``model`` (input (N, *input_shape): pixels, or a trunk's hidden states for a head -> logits (N,))
    as ONNX with a dynamic batch axis, outputs shaped (N, 1) as the Triton config declares, and verify it on
    random input with ONNX Runtime."""

    class _Column(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.inner(pixels).reshape(-1, 1)

    model = model.eval().cpu()
    _eager_attention(model)
    wrapped = _Column(model).eval()
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, *input_shape, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode():
        # Shape checks in Python turn into trace-time constants; the batch axis stays dynamic below.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, chosen on purpose
        torch.onnx.export(
            wrapped, (sample,), str(path), input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=OPSET,
            dynamo=False,
        )
        expected = wrapped(torch.randn(3, *input_shape, generator=generator.manual_seed(seed + 1)))
    check = torch.randn(3, *input_shape, generator=generator.manual_seed(seed + 1)).numpy()
    got = _run_onnx(path, input_name, check)
    worst = float(np.max(np.abs(got - expected.numpy())))
    if got.shape != tuple(expected.shape) or worst > atol:
        raise ExportMismatch(f"{path}: ONNX Runtime output differs from torch by {worst:g} (shape {got.shape})")
    log.info("triton.onnx_exported", path=str(path), bytes=path.stat().st_size, max_abs_diff=worst)
    return path


def _run_onnx(path: Path, input_name: str, pixels: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # the check is part of the export, not optional
        raise RuntimeError("verifying the ONNX export needs onnxruntime (pip install onnxruntime)") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {input_name: pixels})[0])
