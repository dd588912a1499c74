"""Registers the built-in `pin-clip` detector (plugin name ``builtin-pinclip``).

Until trained weights are in ``weights/`` (or ``detectors.options.pin-clip.weights_dir`` names a folder that
holds them) it registers nothing and logs one warning, so `scan` and the worker run without it.
"""

from __future__ import annotations

from pathlib import Path

from streamguard.config import Settings
from streamguard.hookspecs import hookimpl
from streamguard.builtin.finetuned import detector_spec, weights_dir

NAME = "pin-clip"
WEIGHTS_DIR = Path(__file__).parent / "weights"


@hookimpl
def register_detectors(register, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    spec = detector_spec(NAME, weights_dir(settings, NAME, WEIGHTS_DIR), settings,
                         description="PiN-CLIP: CLIP ViT fine-tuned with LoRA under positive-incentive noise.")
    if spec is not None:
        register(spec)
