"""The contract between streamguard and a detector plugin.

A plugin hands over a `DetectorSpec` from its ``register_detectors`` hook. The spec is cheap to build;
weights load only when the worker or a command calls ``spec.load``, once, at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Re-exported: a spec carries its calibration, and plugins import both from here.
from streamguard.detectors.calibration import CALIBRATION_FILE, Calibration, sigmoid
from streamguard.intake.contract import InputContract
from streamguard.intake.decode import DecodedImage

__all__ = ["CALIBRATION_FILE", "CLASS_TOKENS", "CLIP_TRUNK", "VIEW_SEPARATOR", "BackendUnavailable", "BranchContext",
           "BranchPoint", "Calibration", "DetectorBackend", "DetectorInput", "DetectorSpec", "LoadContext", "TrunkSpec",
           "sigmoid"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
# In a version, what follows it names a choice made on the client (the views of an image a detector scores),
# which changes the scores but not the served model.
VIEW_SEPARATOR = "@"


@dataclass(frozen=True)
class DetectorInput:
    """One image as a detector receives it: ``pixels`` prepared to the detector's contract (None for
    detectors that declared no contract), and the decoded image with its metadata.

    Under a multi-view contract ``pixels`` is (views, 3, size, size) and ``views`` holds each view as its
    own array: the runner hands those to the backend as separate inputs, and detectors sharing the contract
    get the very same arrays (which is how a shared trunk recognises a batch it already computed)."""

    pixels: np.ndarray | None
    image: DecodedImage
    views: tuple[np.ndarray, ...] = ()


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


CLIP_TRUNK = "clip"
# A branch point that is no block: the class token after every block, for heads that read them all.
CLASS_TOKENS = "class-tokens"
BranchPoint = int | str  # what a trunk answers at: a block index, or `CLASS_TOKENS`


@dataclass(frozen=True)
class BranchContext:
    """What a head's loader may use: the shared trunk's loaded backbone, the torch device and the
    detector's own options. The backbone is shared by every head on the trunk: copy what you change."""

    trunk: Any  # for ``"clip"``: the `streamguard.backbone.ClipImageEncoder` of the ``backbone.*`` settings
    device: str = "cpu"
    options: Mapping[str, Any] = field(default_factory=dict)
    # What the trunk runs its blocks at (``backbone.precision``); ``trunk`` itself stays fp32 for heads to copy
    # blocks from. A head that copies blocks converts its copies to this (`streamguard.backbone.precision`).
    precision: str = "fp32"


@dataclass(frozen=True)
class TrunkSpec:
    """A detector that is a head on a shared backbone: in-process, the backbone's blocks up to the branch
    point run once per batch for every detector that branches off it, instead of once per detector.

    - ``backbone``: which trunk. ``"clip"`` (`CLIP_TRUNK`) is the CLIP image encoder of the ``backbone.*``
      settings, the one the built-in detectors stand on; it takes CLIP-normalised pixels.
    - ``branch_block``: the first encoder block the head runs itself. The head receives the hidden states
      entering that block, (N, 1 + patches, hidden) with the class token first; 0 is the token embeddings
      (pre-layernorm applied) and None the output of the last block (before the post-layernorm).
      `CLASS_TOKENS` instead: the head receives the class token after each block, (N, blocks, hidden), the
      trunk running them all (RINE's reading of CLIP: the middle blocks carry what the output discards).
    - ``load_head``: builds the head, a torch module from those hidden states to one logit per image.
      Called once per process, with the trunk loaded.

    A detector with a trunk still needs ``DetectorSpec.load`` (its whole model): it is used when
    ``detectors.shared_trunk`` is off and for benchmarks and parity checks.
    """

    backbone: str
    branch_block: BranchPoint | None  # a block index, None or `CLASS_TOKENS`
    load_head: Callable[[BranchContext], Any]

    def __post_init__(self) -> None:
        check_branch_point(self.branch_block)


def check_branch_point(point: BranchPoint | None) -> None:
    """Refuse what is no branch point: a negative block index, or a name other than `CLASS_TOKENS`."""
    if point is None or point == CLASS_TOKENS:
        return
    if not isinstance(point, int) or point < 0:
        raise ValueError(f"branch_block counts blocks from the input (or is {CLASS_TOKENS!r}) and cannot be "
                         f"{point!r}")


@dataclass(frozen=True)
class DetectorSpec:
    """A detector as registered by a plugin.

    - ``name``: unique, lower case; used in config (weights, options, allow/deny) and in every score.
    - ``version``: must change whenever the weights or the preprocessing change; dedupe keys and
      verdicts record it. A preprocessing choice the served model does not know of (the views scored) goes
      after `VIEW_SEPARATOR`: `served_version` is what the model itself must carry.
    - ``contract``: the input the model wants; None when it reads only the image's metadata.
    - ``load``: builds the backend (loads weights); called once per process.
    - ``weights_dir``: the detector's weights directory, where ``streamguard calibrate`` writes.
    - ``triton_model``: the model serving it on Triton, when ``detectors.backend`` selects Triton. The model
      takes the contract's pixels as ``PIXELS`` and returns ``LOGITS``, and its config parameter
      ``streamguard_version`` must equal ``version`` (else its logits would meet another calibration).
    - ``trunk``: where it branches off a shared backbone, if it does (see `TrunkSpec`); None: it runs
      its own whole model, as any detector may.
    - ``triton_backend``: builds the backend that calls ``triton_model``, for a model whose inputs are more
      than the contract's pixels: called with the model's name, the ``triton.*`` settings (a
      `streamguard.config.TritonSettings`) and the expected version. None: the generic Triton backend.
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
    trunk: TrunkSpec | None = None
    triton_backend: Callable[[str, Any, str], DetectorBackend] | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"detector name {self.name!r} must match {_NAME.pattern}")
        if not self.version:
            raise ValueError(f"detector {self.name!r} needs a version")

    @property
    def served_version(self) -> str:
        """The version its model carries, on Triton or a trunk: ``version`` without the client's choices."""
        return self.version.partition(VIEW_SEPARATOR)[0]
