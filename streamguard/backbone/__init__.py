"""The CLIP ViT image encoder the built-in detectors stand on: converted once at set-up
(``streamguard backbone fetch``), loaded offline (``load_backbone``).

torch and transformers load with this package, so import it only where a model is needed.
"""

from streamguard.backbone.errors import (
    BackboneCorrupt,
    BackboneError,
    BackboneMissing,
    CheckpointError,
    ConversionError,
)
from streamguard.backbone.fetch import FetchResult, fetch_backbone
from streamguard.backbone.load import load_backbone
from streamguard.backbone.model import ClipImageEncoder
from streamguard.backbone.precision import Precision, PrecisionUnsupported

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
