"""The whole plugin contract. Each hook is documented in docs/plugins.md and has a ``test_hook_<name>`` test.

Built-in fusion and policy are plugins like any other, registered with ``trylast`` so a third-party
implementation of a ``firstresult`` hook replaces them by returning a value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from streamguard.config import FusionSettings, PolicySettings, Settings
    from streamguard.detectors.spec import DetectorSpec
    from streamguard.fusion import FusedScore
    from streamguard.policy import Decision
    from streamguard.schemas import DetectorScore, Verdict

PROJECT = "streamguard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_detectors(register: Callable[[DetectorSpec], None], settings: Settings) -> None:
    """Register detectors: call ``register(DetectorSpec(...))`` once for each detector the plugin provides."""


@hookspec(firstresult=True)
def fuse_scores(scores: Sequence[DetectorScore], settings: FusionSettings) -> FusedScore | None:
    """Combine one image's detector scores into a `FusedScore`; the first non-None result is used."""


@hookspec(firstresult=True)
def decide_verdict(fused: FusedScore, scores: Sequence[DetectorScore], settings: PolicySettings) -> Decision | None:
    """Turn the fused score into a `Decision` (label and policy version); the first non-None result is used."""


@hookspec
def verdict_ready(verdict: Verdict) -> None:
    """Observe each final verdict before it is published; return values are ignored, errors are logged."""
