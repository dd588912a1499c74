"""``build_repository``: a deployable Triton model repository from the templates in ``triton_repo/``.

The template's ``config.pbtxt`` carries empty ``parameters``; the build writes absolute paths (the univfd head,
the backbone cache or checkpoint) and the detector version into the copy, and picks the instance kind. The
ONNX / TensorRT export is not part of this build: the model runs as torch in the Python backend.
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


@dataclass(frozen=True)
class BuildResult:
    repository: Path
    model: str
    version: str
    device: Device


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


def build_repository(out: Path, device: Device = "cpu", weights_dir: Path | None = None,
                     backbone: BackboneSettings | None = None, templates: Path = TEMPLATES) -> BuildResult:
    """Write ``out/univfd`` (config.pbtxt + 1/model.py); ``out`` may hold other models, ``out/univfd`` is replaced."""
    from streamguard.builtin.univfd.model import HEAD_FILE, weights_digest
    from streamguard.builtin.univfd.plugin import WEIGHTS_DIR

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    weights = (weights_dir or WEIGHTS_DIR).expanduser().resolve()
    if not (weights / HEAD_FILE).is_file():
        raise FileNotFoundError(f"no univfd head at {weights / HEAD_FILE}")
    backbone = backbone or BackboneSettings()
    source = templates / MODEL
    if not (source / "config.pbtxt").is_file():
        raise FileNotFoundError(f"no Triton template at {source}")
    version = f"univfd-1+{weights_digest(weights)}"

    config = (source / "config.pbtxt").read_text()
    config = _set_parameter(config, "weights_dir", str(weights))
    config = _set_parameter(config, "backbone_cache_dir", str(backbone.cache_dir.expanduser().resolve()))
    checkpoint = backbone.checkpoint.expanduser().resolve() if backbone.checkpoint is not None else None
    config = _set_parameter(config, "backbone_checkpoint", str(checkpoint) if checkpoint else "")
    config = _set_parameter(config, "streamguard_version", version)
    config = _set_kind(config, device)

    out = out.expanduser().resolve()
    target = out / MODEL
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (target / "config.pbtxt").write_text(config)
    return BuildResult(repository=out, model=MODEL, version=version, device=device)
