"""``build_repository``: a deployable Triton model repository from the templates in ``triton_repo/``.

Two formats:
- ``python`` (default): the torch model in Triton's Python backend. The template's ``config.pbtxt`` carries
  empty ``parameters``; the build writes absolute paths (the univfd head, the backbone cache or checkpoint)
  and the detector version into the copy, and picks the instance kind.
- ``onnx``: the model exported to ``1/model.onnx`` (checked against torch with ONNX Runtime) under
  ``config.onnx.pbtxt``: ONNX Runtime backend, and on GPU the TensorRT execution accelerator at fp16.

Both carry ``streamguard_version``, which the worker's Triton backend checks against its own detector spec.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from streamguard.config import BackboneSettings

MODEL = "univfd"
TEMPLATES = Path(__file__).resolve().parents[2] / "triton_repo"

Device = Literal["cpu", "gpu"]
Format = Literal["python", "onnx"]
ONNX_TEMPLATE = "config.onnx.pbtxt"


@dataclass(frozen=True)
class BuildResult:
    repository: Path
    model: str
    version: str
    device: Device
    format: Format = "python"


def _set_parameter(config: str, key: str, value: str) -> str:
    pattern = re.compile(r'(parameters\s*\{\s*key:\s*"' + re.escape(key) + r'"\s*value\s*\{\s*string_value:\s*)"[^"]*"')
    # json.dumps gives a quoted string whose escapes protobuf's text format reads the same way.
    config, count = pattern.subn(lambda m: m.group(1) + json.dumps(value), config)
    if count != 1:
        raise ValueError(f"template config.pbtxt has {count} entries for parameter {key!r}, expected 1")
    return config


def _set_kind(config: str, device: Device) -> str:
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    config, count = re.subn(r"\bKIND_(CPU|GPU)\b", kind, config)
    if count != 1:
        raise ValueError(f"template config.pbtxt has {count} instance kinds, expected 1")
    return config


def _strip_accelerator(config: str) -> str:
    """CPU instances get no GPU execution accelerator (Triton refuses one on KIND_CPU)."""
    config, count = re.subn(r"# accelerator-begin\n.*?# accelerator-end\n", "", config, flags=re.S)
    if count != 1:
        raise ValueError(f"template {ONNX_TEMPLATE} has {count} accelerator blocks, expected 1")
    return config


def build_repository(out: Path, device: Device = "cpu", weights_dir: Path | None = None,
                     backbone: BackboneSettings | None = None, templates: Path = TEMPLATES,
                     fmt: Format = "python") -> BuildResult:
    """Write ``out/univfd``; ``out`` may hold other models, ``out/univfd`` is replaced."""
    from streamguard.builtin.univfd.model import HEAD_FILE, weights_digest
    from streamguard.builtin.univfd.plugin import WEIGHTS_DIR

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    if fmt not in ("python", "onnx"):
        raise ValueError(f"format must be 'python' or 'onnx', not {fmt!r}")
    weights = (weights_dir or WEIGHTS_DIR).expanduser().resolve()
    if not (weights / HEAD_FILE).is_file():
        raise FileNotFoundError(f"no univfd head at {weights / HEAD_FILE}")
    backbone = backbone or BackboneSettings()
    source = templates / MODEL
    template = source / ("config.pbtxt" if fmt == "python" else ONNX_TEMPLATE)
    if not template.is_file():
        raise FileNotFoundError(f"no Triton template at {template}")
    version = f"univfd-1+{weights_digest(weights)}"

    config = template.read_text()
    config = _set_parameter(config, "streamguard_version", version)
    config = _set_kind(config, device)
    if fmt == "python":
        config = _set_parameter(config, "weights_dir", str(weights))
        config = _set_parameter(config, "backbone_cache_dir", str(backbone.cache_dir.expanduser().resolve()))
        checkpoint = backbone.checkpoint.expanduser().resolve() if backbone.checkpoint is not None else None
        config = _set_parameter(config, "backbone_checkpoint", str(checkpoint) if checkpoint else "")
    elif device == "cpu":
        config = _strip_accelerator(config)

    out = out.expanduser().resolve()
    target = out / MODEL
    if target.exists():
        shutil.rmtree(target)
    if fmt == "python":
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ONNX_TEMPLATE))
    else:
        _export_univfd(target / "1" / "model.onnx", weights, backbone)
    (target / "config.pbtxt").write_text(config)
    return BuildResult(repository=out, model=MODEL, version=version, device=device, format=fmt)


def _export_univfd(path: Path, weights: Path, backbone: BackboneSettings) -> None:
    from streamguard.backbone import load_backbone
    from streamguard.builtin.univfd.model import UnivFD, load_probe
    from streamguard.triton.onnx_export import export_onnx

    encoder = load_backbone(backbone, "cpu")
    probe, _ = load_probe(weights)
    if probe.linear.in_features != encoder.embed_dim:
        raise ValueError(f"the univfd head in {weights} expects {probe.linear.in_features}-d embeddings but the "
                         f"backbone gives {encoder.embed_dim}")
    # The size of univfd's InputContract, which is what the worker sends (and the config declares).
    export_onnx(UnivFD(encoder, probe), path, 224)
