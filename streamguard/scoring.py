"""Bytes to verdicts: hash -> decode -> prepare -> detect -> fuse -> policy -> observe.

The `Scorer` is the one path every front end uses: ``scan`` calls it on files, the worker on Kafka
records, ``eval`` on datasets. It knows nothing about where bytes come from or where verdicts go.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pluggy
import structlog

from streamguard.config import Settings
from streamguard.detectors.runner import DetectorRunner, DetectorUnavailable
from streamguard.detectors.spec import DetectorInput, DetectorSpec
from streamguard.detectors.trunk import SharedTrunks
from streamguard.errors import StreamguardError
from streamguard.fusion import FusedScore
from streamguard.intake import DecodedImage, InputContract, decode_image, decode_side, prepare, prepare_views
from streamguard.plugins import call_each
from streamguard.policy import Decision
from streamguard.registry import collect_detectors
from streamguard.schemas import DetectorScore, Verdict

log = structlog.get_logger(__name__)


class ConfigurationError(Exception):
    """The loaded plugins cannot form a pipeline (e.g. fusion or policy denied with no replacement)."""


class DetectorsUnavailable(Exception):
    """Some detector's server could not be reached: nothing in the batch was judged. Retry once
    `Scorer.available()` says so; the images themselves are fine."""

    def __init__(self, failures: Sequence[DetectorUnavailable]) -> None:
        self.detectors = sorted({f.detector for f in failures})
        super().__init__("; ".join(str(f) for f in failures))


@dataclass(frozen=True)
class ImageJob:
    key: str  # the event id (worker) or the path (scan)
    data: bytes
    sha256: str | None = None  # when the caller hashed the bytes already


@dataclass
class Outcome:
    key: str
    sha256: str
    image: DecodedImage | None = None
    verdict: Verdict | None = None
    error: StreamguardError | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


def _input(image: DecodedImage, contract: InputContract | None) -> DetectorInput:
    if contract is None:
        return DetectorInput(pixels=None, image=image)
    if not contract.multiview:
        return DetectorInput(pixels=prepare(image, contract), image=image)
    views = prepare_views(image, contract)
    return DetectorInput(pixels=views, image=image, views=tuple(views))


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 3)


class Scorer:
    def __init__(self, settings: Settings, pm: pluggy.PluginManager, min_decode_side: int | None = None) -> None:
        """``min_decode_side``: a floor for reduced-size JPEG decoding, for callers that use the decoded
        image beyond the detectors (the worker's perceptual hash)."""
        self._settings = settings
        self._pm = pm
        for hook in ("fuse_scores", "decide_verdict"):
            if not getattr(pm.hook, hook).get_hookimpls():
                raise ConfigurationError(f"no plugin implements {hook}; allow builtin-* or install one")
        self.specs: list[DetectorSpec] = collect_detectors(pm, settings)
        # Detectors on one backbone share its frozen blocks (`detectors.trunk`), where the settings allow.
        self._trunks = SharedTrunks(settings)
        self.runners = [DetectorRunner(spec, settings.detectors, settings.triton, self._trunks) for spec in self.specs]
        self._decode_side = decode_side(spec.contract for spec in self.specs)
        if self._decode_side is not None and min_decode_side is not None:
            self._decode_side = max(self._decode_side, min_decode_side)
        if not self.specs:
            log.warning("scorer.no_detectors", hint="every verdict will be 'uncertain'")
        # Dedupe keys need the policy version before anything is judged: ask the policy once, on an
        # empty score. Policies must return the same version whatever the input (see docs/plugins.md).
        probe: Decision = pm.hook.decide_verdict(
            fused=FusedScore(probability=None, logit=None), scores=[], settings=settings.policy
        )
        self.policy_version = probe.policy_version

    @property
    def decode_side(self) -> int | None:
        """The short side a large JPEG is decoded at (None: full size), for callers that budget pixels."""
        return self._decode_side

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The plugins judging here, for callers that decide again from scores (per tenant)."""
        return self._pm

    @property
    def model_versions(self) -> dict[str, str]:
        return {spec.name: spec.version for spec in self.specs}

    def start(self) -> Scorer:
        for runner in self.runners:
            runner.start()
        # Now that every branch is known: a trunk compiled per set of branch points is made here, not in the
        # first batch, whose timeout an export would overrun.
        self._trunks.prepare()
        return self

    def close(self) -> None:
        for runner in self.runners:
            runner.close()
        self._trunks.close()

    def __enter__(self) -> Scorer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def available(self) -> bool:
        """Whether every detector's backend can answer (servers up and serving the expected models)."""
        return all(runner.available() for runner in self.runners)

    def score(self, jobs: Sequence[ImageJob]) -> list[Outcome]:
        """Decode and judge ``jobs``; each outcome carries a verdict or the error that stopped it."""
        outcomes = self.decode(jobs)
        self.judge([o for o in outcomes if o.image is not None])
        return outcomes

    def decode(self, jobs: Sequence[ImageJob]) -> list[Outcome]:
        """Hash and decode; an outcome has ``image`` set, or ``error`` for bad input."""
        outcomes: list[Outcome] = []
        for job in jobs:
            t0 = time.perf_counter()
            outcome = Outcome(key=job.key, sha256=job.sha256 or hashlib.sha256(job.data).hexdigest())
            outcomes.append(outcome)
            try:
                outcome.image = decode_image(job.data, self._settings.intake, self._decode_side)
            except StreamguardError as exc:
                outcome.error = exc
            outcome.timings_ms["decode"] = _ms(t0)
        return outcomes

    def judge(self, decoded: Sequence[Outcome]) -> None:
        """Run detectors, fusion and policy on decoded outcomes, setting each one's ``verdict``.

        Raises `DetectorsUnavailable`, with no verdict set, when a detector's server cannot be reached."""
        if not decoded:
            return
        t0 = time.perf_counter()
        scores = self._detect([o.image for o in decoded if o.image is not None])
        detect_ms = _ms(t0)
        for outcome, item_scores in zip(decoded, scores, strict=True):
            outcome.timings_ms["detect"] = detect_ms
            outcome.verdict = self._judge(outcome, item_scores)

    def _detect(self, images: list[DecodedImage]) -> list[list[DetectorScore]]:
        """Every detector on every image; detectors run concurrently, each in its own batches."""
        size = self._settings.detectors.batch_size
        started = time.perf_counter()
        pending = []
        prepared: dict[InputContract | None, list[DetectorInput]] = {}
        for runner in self.runners:
            contract = runner.spec.contract
            if contract not in prepared:  # detectors with equal contracts share one preparation
                prepared[contract] = [
                    _input(image, contract)
                    for image in images
                ]
            inputs = prepared[contract]
            for lo in range(0, len(inputs), size):
                chunk = inputs[lo : lo + size]
                pending.append((runner, lo, len(chunk), runner.submit(chunk)))
        per_image: list[list[DetectorScore]] = [[] for _ in images]
        unavailable: list[DetectorUnavailable] = []
        for runner, lo, n, future in pending:
            try:
                scores = runner.collect(future, n, started)
            except DetectorUnavailable as exc:
                unavailable.append(exc)  # collect the rest first: no call is left running unobserved
                continue
            for offset, score in enumerate(scores):
                per_image[lo + offset].append(score)
        if unavailable:
            raise DetectorsUnavailable(unavailable)
        return per_image

    def _judge(self, outcome: Outcome, scores: list[DetectorScore]) -> Verdict:
        t0 = time.perf_counter()
        fused: FusedScore = self._pm.hook.fuse_scores(scores=scores, settings=self._settings.fusion)
        decision: Decision = self._pm.hook.decide_verdict(fused=fused, scores=scores, settings=self._settings.policy)
        outcome.timings_ms["fuse"] = _ms(t0)
        failed = sorted({score.detector for score in scores if score.error is not None})
        verdict = Verdict(
            event_id=outcome.key,
            content_sha256=outcome.sha256,
            label=decision.label,
            probability=fused.probability,
            scores=scores,
            policy_version=decision.policy_version,
            model_versions=self.model_versions,
            timings_ms=dict(outcome.timings_ms),
            degraded=bool(failed),
            failed_detectors=failed,
        )
        call_each(self._pm, "verdict_ready", verdict=verdict)
        return verdict
