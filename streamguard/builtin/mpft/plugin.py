"""Registers the built-in `mpft` detector (plugin name ``builtin-mpft``).

Until trained weights are in ``weights/`` (or ``detectors.options.mpft.weights_dir`` names a folder that
holds them) it registers nothing and logs one warning, so `scan` and the worker run without it.
"""

from __future__ import annotations

from pathlib import Path

from streamguard.builtin.cliphead import ClipHeadDetector
from streamguard.config import Settings
from streamguard.hookspecs import hookimpl

DETECTOR = ClipHeadDetector(
    name="mpft",
    default_weights=Path(__file__).parent / "weights",
    adapters=True,
    description="MPFT: CLIP ViT fine-tuned with LoRA under Texture-Aware Masking.",
    # As univfd's and pin-clip's (docs/validation.md, step 33): off by default and at weight 0, but enabled it
    # must take the same pixels, or the shared trunk would run twice an image.
    default_view="resize-inset",
)
NAME = DETECTOR.name
WEIGHTS_DIR = DETECTOR.default_weights


@hookimpl
def register_detectors(register, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    spec = DETECTOR.spec(settings)
    if spec is not None:
        register(spec)
