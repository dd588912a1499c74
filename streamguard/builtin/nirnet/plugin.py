"""Registers the built-in `nirnet` detector (plugin name ``builtin-nirnet``).

Until a trained model is in ``weights/`` (or ``detectors.options.nirnet.weights_dir`` names a folder that
holds one) it registers nothing and logs one warning, so `scan` and the worker run without it. Registering
needs no torch: the model's modules are imported when the in-process backend loads it.
"""

from __future__ import annotations

from pathlib import Path

from streamguard.builtin.nirnet.detector import NirnetDetector
from streamguard.config import Settings
from streamguard.hookspecs import hookimpl

DETECTOR = NirnetDetector(
    name="nirnet",
    default_weights=Path(__file__).parent / "weights",
    description="NIRNet: noise-imprint extractor with noise, frequency and CLIP semantic branches on native crops.",
)
NAME = DETECTOR.name
WEIGHTS_DIR = DETECTOR.default_weights


@hookimpl
def register_detectors(register, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    spec = DETECTOR.spec(settings)
    if spec is not None:
        register(spec)
