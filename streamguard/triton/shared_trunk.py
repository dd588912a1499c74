"""The names of the shared-trunk models on Triton, for the build that writes them and the worker that calls
them (torch-free).

``streamguard triton build --shared-trunk`` adds three kinds of model: the trunk (`TRUNK_MODEL`: pixels to
what every branch point receives, `hidden_tensor`), one head per detector (`head_model`: what its branch
point receives to its logit) and the ensemble wiring them (`ENSEMBLE_MODEL`: pixels to every
detector's logit, `ensemble_output`, with each detector's version in `version_parameter`). The worker
sends each batch once to the ensemble (``triton.trunk_model``) and hands every detector its output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

TRUNK_MODEL = "clip-trunk"
ENSEMBLE_MODEL = "clip-detectors"
HEAD_INPUT = "HIDDEN"


def _tensor_safe(name: str) -> str:
    # Detector names may hold '-' and '.'; tensor and parameter names stay plain identifiers.
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def models_of(detectors: Iterable[str]) -> list[str]:
    """The models of the ensemble serving ``detectors``: the trunk, their heads, the ensemble."""
    return [TRUNK_MODEL, *(head_model(d) for d in detectors), ENSEMBLE_MODEL]


def head_model(detector: str) -> str:
    return f"{detector}-head"


def hidden_tensor(block: int | str) -> str:
    """The trunk's output for a branch point: ``HIDDEN_<b>`` entering block b, ``CLASS_TOKENS`` for every
    block's class token (`streamguard.detectors.spec.CLASS_TOKENS`)."""
    return f"HIDDEN_{block}" if isinstance(block, int) else _tensor_safe(block).upper()


def ensemble_output(detector: str) -> str:
    return f"LOGITS_{_tensor_safe(detector)}"


def version_parameter(detector: str) -> str:
    return f"streamguard_version_{_tensor_safe(detector)}"
