"""Logits to probabilities: the one sigmoid every score goes through, and a detector's `Calibration`.

The worker's scores, the fusion, evaluation, calibration fitting and the training reports all turn logits
into probabilities here, so they cannot disagree, and none overflows: a raw logit of 1e4 (a confident
detector under a sharp Platt scale) is probability 1.0, not an ``OverflowError`` or a ``nan``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import overload

import numpy as np

CALIBRATION_FILE = "calibration.json"


@overload
def sigmoid(logit: float) -> float: ...


@overload
def sigmoid(logit: np.ndarray) -> np.ndarray: ...


def sigmoid(logit: float | np.ndarray) -> float | np.ndarray:
    """The probability of a logit, for one value or an array; exp is only ever taken of a value <= 0."""
    if isinstance(logit, np.ndarray):
        z = logit.astype(np.float64, copy=False)
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    e = math.exp(logit)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Calibration:
    """Platt scaling of the raw logit: calibrated = scale * logit + bias. Temperature T is scale = 1/T.

    Stored beside a detector's weights as ``calibration.json`` (`save`/`load`), with how it was fitted.
    """

    scale: float = 1.0
    bias: float = 0.0
    method: str = "identity"
    fitted_on: str = ""

    @overload
    def apply(self, logit: float) -> float: ...

    @overload
    def apply(self, logit: np.ndarray) -> np.ndarray: ...

    def apply(self, logit: float | np.ndarray) -> float | np.ndarray:
        """The calibrated logit of a raw one (or of an array of them)."""
        return self.scale * logit + self.bias

    @overload
    def probability(self, logit: float) -> float: ...

    @overload
    def probability(self, logit: np.ndarray) -> np.ndarray: ...

    def probability(self, logit: float | np.ndarray) -> float | np.ndarray:
        """The calibrated probability of a raw logit (or of an array of them)."""
        return sigmoid(self.apply(logit))

    def save(self, weights_dir: Path) -> Path:
        path = weights_dir / CALIBRATION_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, weights_dir: Path) -> Calibration:
        """The stored calibration, or identity when the detector has none yet."""
        path = weights_dir / CALIBRATION_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in ("scale", "bias", "method", "fitted_on") if k in data})
