"""Registers the built-in `mpft` detector (plugin name ``builtin-mpft``).

Until trained weights are in ``weights/`` (or ``detectors.options.mpft.weights_dir`` names a folder that
holds them) it registers nothing and logs one warning, so `scan` and the worker run without it.
"""

from __future__ import annotations

from pathlib import Path

from streamguard.config import Settings
from streamguard.hookspecs import hookimpl
from streamguard.builtin.finetuned import detector_spec, weights_dir

NAME = "mpft"
WEIGHTS_DIR = Path(__file__).parent / "weights"


@hookimpl
def register_detectors(register, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    spec = detector_spec(NAME, weights_dir(settings, NAME, WEIGHTS_DIR), settings,
                         description="MPFT: CLIP ViT fine-tuned with LoRA under Texture-Aware Masking.")
    if spec is not None:
        register(spec)
