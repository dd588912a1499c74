"""The shared-trunk ensemble on Triton as a trunk (`streamguard.detectors.trunk`): one request per batch,
and every detector on it reads its own logit from the answer.

Torch-free: it is the worker's Triton path. The ensemble's name is ``triton.trunk_model``; its outputs and
the parameters holding each detector's version are named by `streamguard.triton.shared_trunk`, and every
detector that branches off it adds its version to what the backend checks before the next request.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from streamguard.backends.triton_grpc import TritonBackend
from streamguard.config import TritonSettings
from streamguard.triton.shared_trunk import ensemble_output, version_parameter


class TritonTrunk:
    def __init__(self, model: str, settings: TritonSettings) -> None:
        self._backend = TritonBackend(model, settings, detector=model, outputs=())

    def branch(self, detector: str, version: str) -> str:
        """The output that answers for ``detector``, whose version the ensemble must serve."""
        self._backend.expect(version_parameter(detector), version)
        return ensemble_output(detector)

    def run(self, pixels: Sequence[np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        return self._backend.infer(np.stack(pixels), outputs)

    def ready(self) -> bool:
        return self._backend.ready()

    def close(self) -> None:
        self._backend.close()


class Logits:
    """The "head" of a detector on the ensemble: its output is already its logit."""

    def predict(self, values: np.ndarray) -> list[float | None]:
        return [float(v) for v in values]

    def close(self) -> None:
        pass
