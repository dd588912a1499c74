"""Registers the built-in `credentials` detector (plugin ``builtin-credentials``): C2PA content credentials.

It registers only when ``credentials.trust_anchors`` names the operator's trust anchors: without them no
manifest can be trusted, and the detector could only ever abstain. c2pa-python is imported when the detector
loads, not here; without it the detector still loads, says so once, and abstains on every image.

A credential counts only when c2pa reports the store Trusted (signature, chain to an anchor, every hash).
Then a declared generation is a large positive logit and a declared capture a negative one; everything else
(no manifest, untrusted or tampered, trusted but declaring neither) abstains, and a manifest found is logged
(``credentials.manifest``) with what it claimed and why it counted or not.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from typing import TYPE_CHECKING

import structlog

from streamguard.builtin.credentials.manifest import INVALID, UNREADABLE, Finding
from streamguard.config import (
    VALIDATED_FUSED_BIAS,
    VALIDATED_FUSED_SCALE,
    VALIDATED_REAL_THRESHOLD,
    VALIDATED_WEIGHTS,
    Settings,
)
from streamguard.detectors.spec import DetectorBackend, DetectorInput, DetectorSpec, LoadContext
from streamguard.hookspecs import hookimpl

if TYPE_CHECKING:
    from streamguard.builtin.credentials.verify import Verifier

NAME = "credentials"
# The rules' version; the registered version adds the library's and the anchors' (see `_version`).
RULES_VERSION = "credentials-1"
LIBRARY = "c2pa-python"
# Not fitted (no data set here holds trusted credentials): sized for the shipped fusion (config.py), the
# weighted mean of calibrated logits, recalibrated as sigmoid(scale * mean + bias), with `credentials`
# weighted 6 against the CLIP detectors' 2.0, and the shipped policy.
# - Generated, +15: the mean is at least (6 * 15 - 2 * 12) / 8 = 8.25 (p 0.993 under the fusion of
#   2026-12-07, over its 0.95 flag; 0.991 under 2026-12-06's, 0.996 under 2026-12-05's) even when the CLIP
#   detectors average -12 (p 5e-4 of AI): a trusted generator's word carries the verdict.
# - Captured: real while the CLIP detectors' own verdict stays under CAPTURED_CLEARS_UNDER; above that
#   uncertain, so a person looks (a trusted camera can still photograph a screen). Derived from the validated
#   fusion rather than written down, because every new calibration or real threshold moved it (-2.5, sized by
#   hand, under real 0.31; -1.8 under the learned-noise pin-clip's 0.59 / 0.04; -2.1 under 0.55 / 0.14;
#   -2.4 under 0.62 / 0.17, real 0.33; -1.6 under 0.64 / 0.14, real 0.41; -2.5 under 0.57 / 0.08, real 0.33;
#   -2.2 under 0.58 / 0.14, real 0.36).
GENERATED_LOGIT = 15.0
CAPTURED_CLEARS_UNDER = 0.75


def _captured_logit() -> float:
    """The logit at which the fused mean sits on `real_threshold` exactly when the CLIP detectors alone would
    say CAPTURED_CLEARS_UNDER; rounded to 0.1, as the hand-sized values were."""
    def mean_at(probability: float) -> float:  # the fused mean the recalibration maps to this probability
        return (math.log(probability / (1 - probability)) - VALIDATED_FUSED_BIAS) / VALIDATED_FUSED_SCALE

    own = VALIDATED_WEIGHTS[NAME]
    others = sum(weight for name, weight in VALIDATED_WEIGHTS.items() if name != NAME)
    return round(((own + others) * mean_at(VALIDATED_REAL_THRESHOLD) - others * mean_at(CAPTURED_CLEARS_UNDER))
                 / own, 1)


CAPTURED_LOGIT = _captured_logit()

log = structlog.get_logger(__name__)


def logit_for(finding: Finding) -> float | None:
    """The raw logit a finding is worth; None (abstain) unless it is trusted and declares something."""
    if not finding.trusted:
        return None
    return {"generated": GENERATED_LOGIT, "captured": CAPTURED_LOGIT}.get(finding.declared)


class CredentialsBackend:
    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier

    def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
        return [self._score(item) for item in batch]

    def _score(self, item: DetectorInput) -> float | None:
        data = item.image.data
        finding = self._verifier.read(data, item.image.format)
        if finding is None:
            return None  # no manifest: the common case, and nothing to say
        logit = logit_for(finding)
        # Tampering and unreadable stores are worth a warning; an untrusted signer or a remote store is routine.
        emit = log.warning if finding.state in (INVALID, UNREADABLE) else log.info
        emit("credentials.manifest", content_sha256=hashlib.sha256(data).hexdigest(), state=finding.state,
             declared=finding.declared, counted=logit is not None, logit=logit, reason=finding.reason,
             issuer=finding.issuer, claim_generator=finding.claim_generator,
             source_types=list(finding.source_types), failures=list(finding.failures))
        return logit

    def close(self) -> None:
        self._verifier.close()


class AbstainingBackend:
    """The detector without its library: no opinion on any image."""

    def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
        return [None] * len(batch)

    def close(self) -> None:
        return None


def _load(trust_anchors_pem: str, ctx: LoadContext) -> DetectorBackend:
    try:
        from streamguard.builtin.credentials.verify import Verifier
    except ImportError as exc:
        log.warning("credentials.library_missing", error=f"{type(exc).__name__}: {exc}",
                    effect="the credentials detector abstains on every image",
                    hint=f"install streamguard with its dependencies ({LIBRARY})")
        return AbstainingBackend()
    return CredentialsBackend(Verifier(trust_anchors_pem))


def _version(trust_anchors_pem: str) -> str:
    """What decides a score: the rules, the verifying library and the anchors. Any of them changing must
    re-score cached content (dedupe keys hold the version): a distrusted anchor must stop counting."""
    try:
        library = distribution_version(LIBRARY)
    except PackageNotFoundError:
        library = "missing"
    anchors = hashlib.sha256(trust_anchors_pem.encode()).hexdigest()[:12]
    return f"{RULES_VERSION}+c2pa-{library}+anchors-{anchors}"


@hookimpl
def register_detectors(register, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    path = settings.credentials.trust_anchors
    if path is None:
        log.info("credentials.off", reason="credentials.trust_anchors is not set: no manifest could be trusted")
        return
    anchors = path.read_text(encoding="utf-8")
    register(
        DetectorSpec(
            name=NAME,
            version=_version(anchors),
            load=functools.partial(_load, anchors),
            contract=None,
            description="C2PA content credentials: a trusted manifest's declared generation or capture.",
        )
    )
