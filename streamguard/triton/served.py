"""The detectors a Triton repository can serve, and how each one's torch model is built from its weights.

One table for the build (which models, which version string) and for the Python backend's model (what to
load), so a served model and the worker's `DetectorSpec` can never disagree on the version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from streamguard.backbone import ClipImageEncoder


@dataclass(frozen=True)
class ServedDetector:
    name: str
    default_weights: Path
    has_weights: Callable[[Path], bool]
    version: Callable[[Path], str]
    build: Callable[[ClipImageEncoder, Path], torch.nn.Module]  # encoder (this model's own copy), weights dir


def _univfd() -> ServedDetector:
    from streamguard.builtin.univfd.model import HEAD_FILE, build_univfd, detector_version
    from streamguard.builtin.univfd.plugin import NAME, WEIGHTS_DIR

    return ServedDetector(NAME, WEIGHTS_DIR, lambda d: (d / HEAD_FILE).is_file(), detector_version, build_univfd)


def _fine_tuned(name: str, default: Path) -> ServedDetector:
    from streamguard.training.artifacts import detector_version, has_weights, load_detector

    return ServedDetector(name, default, has_weights, lambda d: detector_version(name, d),
                          lambda encoder, d: load_detector(encoder, d, name))


def served_detectors() -> dict[str, ServedDetector]:
    from streamguard.builtin.mpft.plugin import NAME as MPFT, WEIGHTS_DIR as MPFT_WEIGHTS
    from streamguard.builtin.pinclip.plugin import NAME as PINCLIP, WEIGHTS_DIR as PINCLIP_WEIGHTS

    table = [_univfd(), _fine_tuned(PINCLIP, PINCLIP_WEIGHTS), _fine_tuned(MPFT, MPFT_WEIGHTS)]
    return {d.name: d for d in table}


def served_detector(name: str) -> ServedDetector:
    table = served_detectors()
    if name not in table:
        raise ValueError(f"no served detector {name!r}; known: {', '.join(table)}")
    return table[name]
