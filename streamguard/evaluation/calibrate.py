"""Fit a detector's `Calibration` on its raw logits: temperature (scale only) or Platt (scale and bias).

Both minimize the mean log-loss of ``sigmoid(scale * logit + bias)``. Scale is bounded: on separable data
the unbounded optimum is an infinite scale, and a bound keeps the fit finite and reproducible. Temperature
keeps the scale positive (it may soften or sharpen, never flip, the detector); Platt may flip a detector
that is anti-correlated on the data, which the command then warns about.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import minimize

from streamguard.detectors.calibration import Calibration, sigmoid
from streamguard.evaluation.metrics import expected_calibration_error, log_loss

Method = Literal["temperature", "platt"]
METHODS: tuple[Method, ...] = ("temperature", "platt")
_MAX_SCALE = 1e4
_MIN_TEMPERATURE_SCALE = 1e-4


@dataclass(frozen=True)
class CalibrationQuality:
    ece: float | None
    log_loss: float | None


def quality(logits: Sequence[float], labels: Sequence[int], calibration: Calibration) -> CalibrationQuality:
    x, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    p = calibration.probability(x)
    return CalibrationQuality(expected_calibration_error(y, p), log_loss(y, p))


def fit_calibration(
    logits: Sequence[float], labels: Sequence[int], method: Method = "temperature", fitted_on: str = ""
) -> Calibration:
    """The calibration that minimizes log-loss on (raw logit, label) pairs. Needs both classes."""
    x, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(x) == 0 or y.min() == y.max():
        raise ValueError("calibration needs both real and fake images with a score")

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        scale, bias = params[0], params[1] if method == "platt" else 0.0
        z = scale * x + bias
        value = float(np.mean(np.logaddexp(0.0, z) - y * z))
        residual = sigmoid(z) - y
        grad = [np.mean(residual * x)] + ([np.mean(residual)] if method == "platt" else [])
        return value, np.asarray(grad)

    if method == "platt":
        start, bounds = np.array([1.0, 0.0]), [(-_MAX_SCALE, _MAX_SCALE), (-_MAX_SCALE, _MAX_SCALE)]
    else:
        start, bounds = np.array([1.0]), [(_MIN_TEMPERATURE_SCALE, _MAX_SCALE)]
    fit = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    scale = float(fit.x[0])
    bias = float(fit.x[1]) if method == "platt" else 0.0
    return Calibration(scale=round(scale, 8), bias=round(bias, 8), method=method, fitted_on=fitted_on)
