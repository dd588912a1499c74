"""The files a fine-tuned CLIP detector (pin-clip, mpft) ships as, its version and its `DetectorSpec`.

Torch-free, so the plugins register without it (a worker judging on Triton has none); the served module
is built by `streamguard.training.artifacts.load_detector` when the in-process backend loads it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from streamguard.backends.inprocess import inprocess_loader
from streamguard.config import Settings
from streamguard.detectors.spec import Calibration, DetectorSpec, LoadContext
from streamguard.intake.contract import InputContract

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

LORA_FILE = "lora.safetensors"
HEAD_FILE = "head.safetensors"
META_FILE = "meta.json"
TRAINING_FILE = "training.json"
# The served input; training prepares its images with the same contract (`data`).
CONTRACT = InputContract(size=224, fit="resize")
VERSION_PREFIX = 1  # bump when the served model's structure or preprocessing changes


def has_weights(directory: Path) -> bool:
    return (directory / LORA_FILE).is_file() and (directory / HEAD_FILE).is_file()


def weights_digest(directory: Path) -> str:
    """Changes whenever the adapters or the head change: part of the detector version, hence of dedupe keys."""
    h = hashlib.sha256()
    for name in (LORA_FILE, HEAD_FILE):
        h.update((directory / name).read_bytes())
    return h.hexdigest()[:10]


def detector_version(name: str, directory: Path) -> str:
    return f"{name}-{VERSION_PREFIX}+{weights_digest(directory)}"


def detector_spec(name: str, directory: Path, settings: Settings, description: str) -> DetectorSpec | None:
    """The plugin's `DetectorSpec`, or None (and one warning) while ``directory`` holds no trained weights."""
    if not has_weights(directory):
        log.warning("detector.weights_missing", detector=name, weights_dir=str(directory),
                    hint=f"train them with `streamguard train {name} --out {directory}`, or set "
                         f"detectors.options.{name}.weights_dir")
        return None

    def build(ctx: LoadContext) -> torch.nn.Module:
        from streamguard.backbone import load_backbone
        from streamguard.training.artifacts import load_detector

        return load_detector(load_backbone(settings.backbone, ctx.device), directory, name)

    return DetectorSpec(
        name=name,
        version=detector_version(name, directory),
        load=inprocess_loader(build),
        contract=CONTRACT,
        calibration=Calibration.load(directory),
        weights_dir=directory,
        description=description,
        triton_model=name,  # `streamguard triton build` names the model after the detector
    )


def weights_dir(settings: Settings, name: str, default: Path) -> Path:
    """``detectors.options.<name>.weights_dir`` when set, else the shipped folder."""
    return Path(settings.detectors.options.get(name, {}).get("weights_dir", default))
