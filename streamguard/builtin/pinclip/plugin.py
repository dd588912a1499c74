"""Registers the built-in `pin-clip` detector (plugin name ``builtin-pinclip``).

Until trained weights are in ``weights/`` (or ``detectors.options.pin-clip.weights_dir`` names a folder that
holds them) it registers nothing and logs one warning, so `scan` and the worker run without it.
"""

from __future__ import annotations

from pathlib import Path

from streamguard.builtin.cliphead import ClipHeadDetector
from streamguard.config import Settings
from streamguard.hookspecs import hookimpl

DETECTOR = ClipHeadDetector(
    name="pin-clip",
    default_weights=Path(__file__).parent / "weights",
    adapters=True,
    description="PiN-CLIP: CLIP ViT fine-tuned with LoRA under positive-incentive noise.",
    default_view="resize-inset",  # as univfd's, which it is fused with (docs/validation.md, step 33)
)
NAME = DETECTOR.name
WEIGHTS_DIR = DETECTOR.default_weights


@hookimpl
def register_detectors(register, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    spec = DETECTOR.spec(settings)
    if spec is not None:
        register(spec)
