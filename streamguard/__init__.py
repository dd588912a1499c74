"""streamguard: flag AI-generated images on ingest streams.

The names plugin authors need are re-exported here; torch is imported only by the backends that use it.
"""

from streamguard.detectors.spec import (
    CLASS_TOKENS,
    CLIP_TRUNK,
    BranchContext,
    Calibration,
    DetectorInput,
    DetectorSpec,
    LoadContext,
    TrunkSpec,
)
from streamguard.hookspecs import hookimpl
from streamguard.intake.contract import InputContract

__version__ = "0.1.0"

__all__ = [
    "CLASS_TOKENS",
    "CLIP_TRUNK",
    "BranchContext",
    "Calibration",
    "DetectorInput",
    "DetectorSpec",
    "InputContract",
    "LoadContext",
    "TrunkSpec",
    "__version__",
    "hookimpl",
]
