"""Stand-ins for the built-in CLIP detectors: a fixed logit each, registered under their names.

Fusion weighs a score by its detector's name, so stand-ins named `univfd`, `pin-clip` and `mpft` are weighed
exactly as the real ones under the default weights (`VALIDATED_WEIGHTS`), without loading a CLIP encoder. The real ones must be
denied (the tests' default environment does) or the names would clash.
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from streamguard import DetectorInput, DetectorSpec, hookimpl
from streamguard.config import Settings, load_settings
from streamguard.plugins import build_plugin_manager

CLIP_NAMES = ("univfd", "pin-clip", "mpft")
# The CLIP built-ins (replaced by the stand-ins) and the brightness test detector (which would vote too).
DENY = ["builtin-univfd", "builtin-pinclip", "builtin-mpft", "brightness"]


class _Fixed:
    def __init__(self, logit: float) -> None:
        self.logit = logit

    def predict(self, batch: Sequence[DetectorInput]) -> list[float]:
        return [self.logit] * len(batch)

    def close(self) -> None:
        return None


class ClipStandIn:
    def __init__(self, logit: float) -> None:
        self.logit = logit

    @hookimpl
    def register_detectors(self, register) -> None:  # type: ignore[no-untyped-def]
        for name in CLIP_NAMES:
            register(DetectorSpec(name=name, version="standin", contract=None,
                                  load=lambda ctx, logit=self.logit: _Fixed(logit)))


def pipeline(clip_logit: float, **overrides: object) -> tuple[Settings, pluggy.PluginManager]:
    """Default settings (fusion weights and policy included) with the CLIP detectors all saying ``clip_logit``."""
    settings = load_settings(plugins={"deny": DENY}, **overrides)
    pm = build_plugin_manager(settings.plugins)
    pm.register(ClipStandIn(clip_logit), name="clip-standin")
    return settings, pm
