"""Bytes to verdicts: hash -> decode -> prepare -> detect -> fuse -> policy -> observe.

The `Scorer` is the one path every front end uses: ``scan`` calls it on files, the worker on Kafka
records, ``eval`` on datasets. It knows nothing about where bytes come from or where verdicts go.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import pluggy
import structlog

from streamguard.config import Settings
from streamguard.decide import Judgement
from streamguard.detectors.runner import DetectorRunner, DetectorUnavailable
from streamguard.detectors.spec import DetectorInput, DetectorSpec
from streamguard.detectors.trunk import SharedTrunks
from streamguard.errors import StreamguardError
from streamguard.fusion import FusedScore
from streamguard.intake import (
    DecodedImage,
    ImageHeader,
    InputContract,
    decode_image,
    decode_side,
    prepare,
    prepare_views,
)
from streamguard.plugins import call_each
from streamguard.policy import Decision
from streamguard.registry import collect_detectors
from streamguard.schemas import DetectorScore, Verdict

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")
_MAX_DECODE_THREADS = 4
# Handing an image to a thread costs about as much as decoding a 64x64 PNG (0.2 ms alone, 0.45 ms beside a
# busy worker's other threads): there the threads only add GIL hand-offs (0.78x). Heavier images gain, as
# Pillow decodes and resizes without the GIL: 1.6x for 640x480 JPEGs (2.4 ms), 2x for 1600x1200 ones, two
# threads on two cores. Between the two the gain is real but small; this keeps clear of the light side.
_PARALLEL_MIN_MS = 1.0
_DECODE_MS_SMOOTHING = 0.2


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
    # `read_header` of ``data`` at the scorer's `decode_side`, when the caller read it (to bound a batch):
    # decoded from, instead of parsing the header again.
    header: ImageHeader | None = None


@dataclass
class Outcome:
    key: str
    sha256: str
    image: DecodedImage | None = None
    verdict: Verdict | None = None
    judgement: Judgement | None = None  # how fusion and policy made ``verdict``, for `Decider.decide` to reuse
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


def decode_threads(configured: int) -> int:
    """``intake.decode_threads``, with 0 resolved to the CPUs this process may run on (at most 4)."""
    if configured:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(_MAX_DECODE_THREADS, cpus))


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
        threads = decode_threads(settings.intake.decode_threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        # A moving average of the CPU time one image takes to decode: what decides whether threads pay.
        self._decode_ms: float | None = None
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
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

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
        """Hash and decode, on the decode threads; an outcome has ``image`` set, or ``error`` for bad input.
        Any other exception (a bug, a MemoryError) is raised, the first one of the batch."""
        return self._each(self._decode_one, jobs)

    def _decode_one(self, job: ImageJob) -> Outcome:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        outcome = Outcome(key=job.key, sha256=job.sha256 or hashlib.sha256(job.data).hexdigest())
        try:
            outcome.image = decode_image(job.data, self._settings.intake, self._decode_side, job.header)
        except StreamguardError as exc:
            outcome.error = exc
        outcome.timings_ms["decode"] = _ms(t0)
        # The CPU this thread spent, not the wall time: on a busy worker a light image's wall time is mostly
        # waiting for the GIL, which would turn the threads on exactly where their hand-offs cost the most.
        # Updated from the decode threads without a lock: a lost update only makes the average a little late.
        ms = (time.thread_time() - cpu0) * 1000.0
        last = self._decode_ms
        self._decode_ms = ms if last is None else last + _DECODE_MS_SMOOTHING * (ms - last)
        return outcome

    def _each(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``fn`` on every item, in order: on the decode threads when there are some and the images have
        been heavy enough to pay for the hand-offs (the first batch, unmeasured, runs here)."""
        heavy = self._decode_ms is not None and self._decode_ms >= _PARALLEL_MIN_MS
        if self._pool is None or len(items) < 2 or not heavy:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

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
            outcome.verdict, outcome.judgement = self._judge(outcome, item_scores)

    def _detect(self, images: list[DecodedImage]) -> list[list[DetectorScore]]:
        """Every detector on every image; detectors run concurrently, each in its own batches."""
        size = self._settings.detectors.batch_size
        started = time.perf_counter()
        pending = []
        prepared: dict[InputContract | None, list[DetectorInput]] = {}
        for runner in self.runners:
            contract = runner.spec.contract
            if contract not in prepared:  # detectors with equal contracts share one preparation
                prepared[contract] = self._each(partial(_input, contract=contract), images)
            inputs = prepared[contract]
            for lo in range(0, len(inputs), size):
                chunk = inputs[lo : lo + size]
                pending.append((runner, lo, len(chunk), runner.submit(chunk)))
        per_image: list[list[DetectorScore]] = [[] for _ in images]
        unavailable: list[DetectorUnavailable] = []
        for runner, lo, n, future in pending:
            try:
                scores = runner.collect(future, n, started, queued=lo // size)
            except DetectorUnavailable as exc:
                unavailable.append(exc)  # collect the rest first: no call is left running unobserved
                continue
            for offset, score in enumerate(scores):
                per_image[lo + offset].append(score)
        if unavailable:
            raise DetectorsUnavailable(unavailable)
        return per_image

    def _judge(self, outcome: Outcome, scores: list[DetectorScore]) -> tuple[Verdict, Judgement]:
        t0 = time.perf_counter()
        fusion, policy = self._settings.fusion, self._settings.policy
        fused: FusedScore = self._pm.hook.fuse_scores(scores=scores, settings=fusion)
        decision: Decision = self._pm.hook.decide_verdict(fused=fused, scores=scores, settings=policy)
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
        return verdict, Judgement(fusion, policy, fused, decision)
