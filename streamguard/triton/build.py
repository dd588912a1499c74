"""``build_repository``: a deployable Triton model repository from the templates in ``triton_repo/``.

One model per built-in detector that has weights (`served.served_detectors`), named like the detector.
Two formats:
- ``python`` (default): the torch model in Triton's Python backend, every model from one template
  (``python-template.pbtxt``, ``python-model.py``): the build writes the model's name, the detector it
  serves, absolute paths (its weights, the backbone cache or checkpoint) and the detector version into
  the copy, and picks the instance kind.
- ``onnx``: the model exported to ``<name>/1/model.onnx`` (checked against torch with ONNX Runtime) under
  ``onnx-template.pbtxt``: ONNX Runtime backend, and on GPU the TensorRT execution accelerator at fp16.

Both carry ``streamguard_version``, which the worker's Triton backend checks against its own detector spec.

NIRNet (``nirnet``, when named in ``models`` or given ``weights["nirnet"]``) is written as an ensemble of
Python-backend parts whatever the format (`build_nirnet`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from streamguard.config import BackboneSettings
from streamguard.triton.pbtxt import Device, set_kind, set_name, set_parameter, strip_accelerator
from streamguard.builtin.cliphead import ClipHeadDetector
from streamguard.triton.served import served_detector, served_detectors
from streamguard.triton.shared_trunk import models_of
from streamguard.builtin.nirnet.plugin import NAME as NIRNET, WEIGHTS_DIR as NIRNET_WEIGHTS

TEMPLATES = Path(__file__).resolve().parents[2] / "triton_repo"
ONNX_TEMPLATE = "onnx-template.pbtxt"
PYTHON_TEMPLATE = "python-template.pbtxt"
PYTHON_MODEL = "python-model.py"
# The side of the built-in detectors' InputContract: what the worker sends and the configs declare.
INPUT_SIZE = 224

Format = Literal["python", "onnx"]


@dataclass(frozen=True)
class BuildResult:
    repository: Path
    device: Device
    format: Format
    models: dict[str, str] = field(default_factory=dict)  # model name -> detector version it serves
    # With the shared trunk: detector -> version served by the ensemble (`shared_trunk.ENSEMBLE_MODEL`).
    shared_trunk: dict[str, str] = field(default_factory=dict)

    def model_names(self) -> list[str]:
        """Every model written, for a server with explicit model control to load."""
        return list(self.models) + (models_of(self.shared_trunk) if self.shared_trunk else [])


def default_models(weights: Mapping[str, Path] | None = None) -> list[str]:
    """Every served CLIP detector that has weights, shipped or given; NIRNet only when its weights are given
    (or it is named in ``models``): it is opt-in in the worker, and its ensemble brings a CLIP encoder of its
    own into the server, which a repository for the default detectors should not load."""
    from streamguard.builtin.nirnet.files import has_weights

    weights = weights or {}
    names = [name for name, served in served_detectors().items()
             if served.has_weights(weights.get(name, served.default_weights))]
    return names + ([NIRNET] if NIRNET in weights and has_weights(weights[NIRNET]) else [])


def build_repository(out: Path, device: Device = "cpu", weights: Mapping[str, Path] | None = None,
                     backbone: BackboneSettings | None = None, templates: Path = TEMPLATES,
                     fmt: Format = "python", models: Sequence[str] | None = None,
                     shared_trunk: bool = False, whole_models: bool = True) -> BuildResult:
    """Write ``out/<model>`` for each of ``models`` (default: all with weights); other entries of ``out`` stay.

    ``shared_trunk`` also writes the same detectors on one shared trunk (`build_trunk`): the trunk, a head
    each, and the ensemble the worker calls with ``triton.trunk_model``, in ``fmt`` as the detectors' own.
    ``whole_models`` False (with ``shared_trunk``) writes the CLIP detectors on the trunk only: a server for
    a worker that sets ``triton.trunk_model`` never calls their whole models."""
    if not whole_models and not shared_trunk:
        raise ValueError("whole_models=False leaves nothing to serve the CLIP detectors without shared_trunk")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    if fmt not in ("python", "onnx"):
        raise ValueError(f"format must be 'python' or 'onnx', not {fmt!r}")
    weights = dict(weights or {})
    unknown = set(weights) - set(served_detectors()) - {NIRNET}
    if unknown:
        raise ValueError(f"weights given for unknown detectors: {sorted(unknown)}")
    names = list(models) if models is not None else default_models(weights)
    backbone = backbone or BackboneSettings()
    out = out.expanduser().resolve()
    result = BuildResult(repository=out, device=device, format=fmt)
    built = {}
    for name in names:
        if name == NIRNET:
            # An ensemble of Python-backend parts whatever ``fmt`` (`build_nirnet`); never on the shared trunk.
            from streamguard.triton.build_nirnet import build_nirnet

            directory = weights.get(name, NIRNET_WEIGHTS).expanduser().resolve()
            result.models[name] = build_nirnet(out, directory, device, backbone, templates)
            continue
        served = served_detector(name)
        directory = weights.get(name, served.default_weights).expanduser().resolve()
        if not served.has_weights(directory):
            raise FileNotFoundError(f"no {name} weights in {directory}")
        if whole_models:
            result.models[name] = _build_model(out, served, directory, device, backbone, templates, fmt)
        built[name] = (served, directory)
    if shared_trunk and built:
        from streamguard.triton.build_trunk import build_shared_trunk

        template = templates / (PYTHON_TEMPLATE if fmt == "python" else ONNX_TEMPLATE)
        model_file = templates / PYTHON_MODEL if fmt == "python" else None
        result.shared_trunk.update(build_shared_trunk(out, built, device, backbone, template, model_file))
    return result


def _build_model(out: Path, served: ClipHeadDetector, weights: Path, device: Device, backbone: BackboneSettings,
                 templates: Path, fmt: Format) -> str:
    template = templates / (PYTHON_TEMPLATE if fmt == "python" else ONNX_TEMPLATE)
    model_file = templates / PYTHON_MODEL
    for path in (template, model_file) if fmt == "python" else (template,):
        if not path.is_file():
            raise FileNotFoundError(f"no Triton template at {path}")
    version = served.version(weights)
    config = set_kind(template.read_text(), device)
    config = set_name(config, served.name)
    config = set_parameter(config, "streamguard_version", version)
    if fmt == "python":
        config = set_parameter(config, "detector", served.name)
        config = set_parameter(config, "weights_dir", str(weights))
        config = set_parameter(config, "backbone_cache_dir", str(backbone.cache_dir.expanduser().resolve()))
        checkpoint = backbone.checkpoint.expanduser().resolve() if backbone.checkpoint is not None else None
        config = set_parameter(config, "backbone_checkpoint", str(checkpoint) if checkpoint else "")
    elif device == "cpu":
        config = strip_accelerator(config)
    target = out / served.name
    if target.exists():
        shutil.rmtree(target)
    (target / "1").mkdir(parents=True)
    if fmt == "python":
        shutil.copyfile(model_file, target / "1" / "model.py")
    else:
        _export(target / "1" / "model.onnx", served, weights, backbone)
    (target / "config.pbtxt").write_text(f"# {served.name}: {served.description}\n" + config)
    return version


def _export(path: Path, served: ClipHeadDetector, weights: Path, backbone: BackboneSettings) -> None:
    from streamguard.backbone import load_backbone
    from streamguard.builtin.cliphead.model import build_served
    from streamguard.triton.onnx_export import export_onnx

    export_onnx(build_served(served, load_backbone(backbone, "cpu", precision="fp32"), weights), path,
                (3, INPUT_SIZE, INPUT_SIZE))
