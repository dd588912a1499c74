"""``build_repository``: a deployable Triton model repository from the templates in ``triton_repo/``.

One model per built-in detector that has weights (univfd always; pin-clip and mpft once trained), named
like the detector. Two formats:
- ``python`` (default): the torch model in Triton's Python backend. Each template's ``config.pbtxt``
  carries empty ``parameters``; the build writes absolute paths (the detector's weights, the backbone
  cache or checkpoint) and the detector version into the copy, and picks the instance kind.
- ``onnx``: the model exported to ``<name>/1/model.onnx`` (checked against torch with ONNX Runtime) under
  ``onnx-template.pbtxt``: ONNX Runtime backend, and on GPU the TensorRT execution accelerator at fp16.

Both carry ``streamguard_version``, which the worker's Triton backend checks against its own detector spec.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from streamguard.config import BackboneSettings
from streamguard.triton.served import ServedDetector, served_detector, served_detectors

TEMPLATES = Path(__file__).resolve().parents[2] / "triton_repo"
ONNX_TEMPLATE = "onnx-template.pbtxt"
# The side of the built-in detectors' InputContract: what the worker sends and the configs declare.
INPUT_SIZE = 224

Device = Literal["cpu", "gpu"]
Format = Literal["python", "onnx"]


@dataclass(frozen=True)
class BuildResult:
    repository: Path
    device: Device
    format: Format
    models: dict[str, str] = field(default_factory=dict)  # model name -> detector version it serves


def _set_parameter(config: str, key: str, value: str) -> str:
    pattern = re.compile(r'(parameters\s*\{\s*key:\s*"' + re.escape(key) + r'"\s*value\s*\{\s*string_value:\s*)"[^"]*"')
    # json.dumps gives a quoted string whose escapes protobuf's text format reads the same way.
    config, count = pattern.subn(lambda m: m.group(1) + json.dumps(value), config)
    if count != 1:
        raise ValueError(f"template has {count} entries for parameter {key!r}, expected 1")
    return config


def _set_kind(config: str, device: Device) -> str:
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    config, count = re.subn(r"\bKIND_(CPU|GPU)\b", kind, config)
    if count != 1:
        raise ValueError(f"template has {count} instance kinds, expected 1")
    return config


def _set_name(config: str, name: str) -> str:
    config, count = re.subn(r'(?m)^name:\s*"[^"]*"', f"name: {json.dumps(name)}", config)
    if count != 1:
        raise ValueError(f"template has {count} name lines, expected 1")
    return config


def _strip_accelerator(config: str) -> str:
    """CPU instances get no GPU execution accelerator (Triton refuses one on KIND_CPU)."""
    config, count = re.subn(r"# accelerator-begin\n.*?# accelerator-end\n", "", config, flags=re.S)
    if count != 1:
        raise ValueError(f"{ONNX_TEMPLATE} has {count} accelerator blocks, expected 1")
    return config


def default_models(weights: Mapping[str, Path] | None = None) -> list[str]:
    """Every served detector that has weights, shipped or given."""
    weights = weights or {}
    return [name for name, served in served_detectors().items()
            if served.has_weights(weights.get(name, served.default_weights))]


def build_repository(out: Path, device: Device = "cpu", weights: Mapping[str, Path] | None = None,
                     backbone: BackboneSettings | None = None, templates: Path = TEMPLATES,
                     fmt: Format = "python", models: Sequence[str] | None = None) -> BuildResult:
    """Write ``out/<model>`` for each of ``models`` (default: all with weights); other entries of ``out`` stay."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    if fmt not in ("python", "onnx"):
        raise ValueError(f"format must be 'python' or 'onnx', not {fmt!r}")
    weights = dict(weights or {})
    unknown = set(weights) - set(served_detectors())
    if unknown:
        raise ValueError(f"weights given for unknown detectors: {sorted(unknown)}")
    names = list(models) if models is not None else default_models(weights)
    backbone = backbone or BackboneSettings()
    out = out.expanduser().resolve()
    result = BuildResult(repository=out, device=device, format=fmt)
    for name in names:
        served = served_detector(name)
        directory = weights.get(name, served.default_weights).expanduser().resolve()
        if not served.has_weights(directory):
            raise FileNotFoundError(f"no {name} weights in {directory}")
        result.models[name] = _build_model(out, served, directory, device, backbone, templates, fmt)
    return result


def _build_model(out: Path, served: ServedDetector, weights: Path, device: Device, backbone: BackboneSettings,
                 templates: Path, fmt: Format) -> str:
    source = templates / served.name
    template = source / "config.pbtxt" if fmt == "python" else templates / ONNX_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"no Triton template at {template}")
    version = served.version(weights)
    config = _set_kind(template.read_text(), device)
    config = _set_parameter(config, "streamguard_version", version)
    if fmt == "python":
        config = _set_parameter(config, "weights_dir", str(weights))
        config = _set_parameter(config, "backbone_cache_dir", str(backbone.cache_dir.expanduser().resolve()))
        checkpoint = backbone.checkpoint.expanduser().resolve() if backbone.checkpoint is not None else None
        config = _set_parameter(config, "backbone_checkpoint", str(checkpoint) if checkpoint else "")
    else:
        config = _set_name(config, served.name)
        if device == "cpu":
            config = _strip_accelerator(config)
    target = out / served.name
    if target.exists():
        shutil.rmtree(target)
    if fmt == "python":
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        _export(target / "1" / "model.onnx", served, weights, backbone)
    (target / "config.pbtxt").write_text(config)
    return version


def _export(path: Path, served: ServedDetector, weights: Path, backbone: BackboneSettings) -> None:
    from streamguard.backbone import load_backbone
    from streamguard.triton.onnx_export import export_onnx

    export_onnx(served.build(load_backbone(backbone, "cpu"), weights), path, INPUT_SIZE)
