"""The CLIP ViT image encoder the built-in detectors stand on: converted once at set-up
(``streamguard backbone fetch``), loaded offline (``load_backbone``).

torch and transformers load with what needs them (``load_backbone``, ``ClipImageEncoder``, ...), on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from streamguard.backbone.errors import (
    BackboneCorrupt,
    BackboneError,
    BackboneMissing,
    CheckpointError,
    ConversionError,
)

if TYPE_CHECKING:
    from streamguard.backbone.fetch import FetchResult, fetch_backbone
    from streamguard.backbone.load import load_backbone
    from streamguard.backbone.model import ClipImageEncoder
    from streamguard.backbone.precision import Precision, PrecisionUnsupported

# Loaded on first use (PEP 562): the torch-free modules of this package (`manifest`, `errors`) can then be
# imported where torch is not wanted, e.g. a Triton build of the Python backend that only writes configs.
_LAZY = {
    "FetchResult": "fetch", "fetch_backbone": "fetch", "load_backbone": "load", "ClipImageEncoder": "model",
    "Precision": "precision", "PrecisionUnsupported": "precision",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "BackboneCorrupt",
    "BackboneError",
    "BackboneMissing",
    "CheckpointError",
    "ClipImageEncoder",
    "ConversionError",
    "FetchResult",
    "Precision",
    "PrecisionUnsupported",
    "fetch_backbone",
    "load_backbone",
]
