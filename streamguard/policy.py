"""Default policy (a built-in plugin): two thresholds on the fused probability.

Between them the verdict is ``uncertain``, which platforms route to human review; with no detector
answering it is ``uncertain`` too, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamguard.config import PolicySettings
from streamguard.fusion import FusedScore
from streamguard.hookspecs import hookimpl
from streamguard.schemas import Label


@dataclass(frozen=True)
class Decision:
    label: Label
    policy_version: str


def policy_version(settings: PolicySettings) -> str:
    # The thresholds are part of the version: changing them must invalidate cached verdicts.
    return f"thresholds-1:ai>={settings.ai_threshold:g}:real<={settings.real_threshold:g}"


@hookimpl(trylast=True)
def decide_verdict(fused: FusedScore, settings: PolicySettings) -> Decision:
    version = policy_version(settings)
    p = fused.probability
    if p is None:
        return Decision("uncertain", version)
    if p >= settings.ai_threshold:
        return Decision("ai_generated", version)
    if p <= settings.real_threshold:
        return Decision("real", version)
    return Decision("uncertain", version)
