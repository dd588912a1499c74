"""The contract between streamguard and a detector plugin.

A plugin hands over a `DetectorSpec` from its ``register_detectors`` hook. The spec is cheap to build;
weights load only when the worker or a command calls ``spec.load``, once, at start-up.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from streamguard.intake.contract import InputContract
from streamguard.intake.decode import DecodedImage

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class DetectorInput:
    """One image as a detector receives it: ``pixels`` prepared to the detector's contract (None for
    detectors that declared no contract), and the decoded image with its metadata."""

    pixels: np.ndarray | None
    image: DecodedImage


class BackendUnavailable(Exception):
    """The server a detector runs on cannot answer now (down, restarting, overloaded), retries included.

    Not a verdict on the image and not the detector's fault: the worker holds the records, pauses
    consumption and tries again once the backend reports ready, instead of publishing error scores.
    """


@runtime_checkable
class DetectorBackend(Protocol):
    """Where a detector's model runs: in-process torch, or a Triton server in production.

    A backend that depends on a server may also define ``ready() -> bool`` (cheap, cached): the worker asks
    it during an outage and for its readiness probe. Backends without it are always ready once loaded.
    """

    def predict(self, batch: Sequence[DetectorInput]) -> Sequence[float | None]:
        """One raw logit per input, in order; None where the detector abstains (no evidence either way).

        Raises `BackendUnavailable` when the serving infrastructure, not the input, is the problem."""
        ...

    def close(self) -> None:
        """Release what the backend holds (threads, sessions, device memory)."""
        ...


@dataclass(frozen=True)
class LoadContext:
    """What a detector's loader may use: the torch device and its own options from the config."""

    device: str = "cpu"
    options: Mapping[str, Any] = field(default_factory=dict)


CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    """Platt scaling of the raw logit: calibrated = scale * logit + bias. Temperature T is scale = 1/T.

    Stored beside a detector's weights as ``calibration.json`` (`save`/`load`), with how it was fitted.
    """

    scale: float = 1.0
    bias: float = 0.0
    method: str = "identity"
    fitted_on: str = ""

    def apply(self, logit: float) -> float:
        return self.scale * logit + self.bias

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


@dataclass(frozen=True)
class DetectorSpec:
    """A detector as registered by a plugin.

    - ``name``: unique, lower case; used in config (weights, options, allow/deny) and in every score.
    - ``version``: must change whenever the weights or the preprocessing change; dedupe keys and
      verdicts record it.
    - ``contract``: the input the model wants; None when it reads only the image's metadata.
    - ``load``: builds the backend (loads weights); called once per process.
    - ``weights_dir``: the detector's weights directory, where ``streamguard calibrate`` writes.
    - ``triton_model``: the model serving it on Triton, when ``detectors.backend`` selects Triton. The model
      takes the contract's pixels as ``PIXELS`` and returns ``LOGITS``, and its config parameter
      ``streamguard_version`` must equal ``version`` (else its logits would meet another calibration).
    """

    name: str
    version: str
    load: Callable[[LoadContext], DetectorBackend]
    contract: InputContract | None = field(default_factory=InputContract)
    calibration: Calibration = field(default_factory=Calibration)
    description: str = ""
    weights_dir: Path | None = None  # where its weights and calibration.json live, for `calibrate`
    # Its model's name in a Triton repository (`streamguard triton build`); None: it runs in-process only.
    triton_model: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"detector name {self.name!r} must match {_NAME.pattern}")
        if not self.version:
            raise ValueError(f"detector {self.name!r} needs a version")


def sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    z = math.exp(logit)
    return z / (1.0 + z)
