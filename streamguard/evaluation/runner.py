"""Score samples through the worker's own `Scorer`, one detector or the fused verdict, with a score cache.

``detector="<name>"`` denies every other detector (``plugins.deny`` takes detector names) and scores with
that detector's calibrated probability; the cache keeps its RAW logit, so a new calibration reuses every
cached score and ``calibrate`` reads raw logits straight from it. ``detector="fused"`` runs all configured
detectors and scores with the verdict's fused probability.

Per sample the result is a score, an abstention (the detector had no evidence: score None, no error) or an
error (unreadable bytes, an image that does not decode, a detector failure), never an exception. In fused
mode a sample on which any detector failed is an error: a degraded verdict is not the system under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pluggy
import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from streamguard.config import Settings
from streamguard.detectors.spec import DetectorSpec
from streamguard.evaluation.cache import MISSING, ScoreCache
from streamguard.evaluation.datasets import Sample, SampleReader, SampleReadError
from streamguard.evaluation.perturb import NONE, cache_tag, perturb
from streamguard.registry import collect_detectors
from streamguard.scoring import ImageJob, Outcome, Scorer

log = structlog.get_logger(__name__)

FUSED = "fused"
DEFAULT_CACHE_DIR = Path(".cache/eval")
CACHE_FILE = "scores.sqlite"


class UnknownDetector(ValueError):
    def __init__(self, name: str, available: Sequence[str]) -> None:
        super().__init__(f"no detector named {name!r}; available: {', '.join(available) or 'none'} (or 'fused')")
        self.available = list(available)


@dataclass(frozen=True)
class ScoredSample:
    """One sample under one perturbation. ``score`` is the calibrated probability of fake; ``logit`` the
    detector's raw (uncalibrated) logit in single-detector mode, None in fused mode."""

    sample: Sample
    perturbation: str
    score: float | None
    logit: float | None = None
    error: str | None = None
    cached: bool = False

    @property
    def abstained(self) -> bool:
        return self.error is None and self.score is None


@dataclass
class RunStats:
    scored: int = 0  # went through the Scorer this run
    cache_hits: int = 0
    errors: int = 0
    abstained: int = 0


def detector_names(settings: Settings, pm: pluggy.PluginManager) -> list[str]:
    return [spec.name for spec in collect_detectors(pm, settings)]


def restrict_to(settings: Settings, pm: pluggy.PluginManager, detector: str) -> Settings:
    """Settings that load ``detector`` alone (or all detectors for ``fused``); UnknownDetector otherwise."""
    if detector == FUSED:
        return settings
    names = detector_names(settings, pm)
    if detector not in names:
        raise UnknownDetector(detector, names)
    deny = [*settings.plugins.deny, *(n for n in names if n != detector)]
    return settings.model_copy(update={"plugins": settings.plugins.model_copy(update={"deny": deny})})


def _error(exc: BaseException) -> str:
    return f"{getattr(exc, 'error_type', type(exc).__name__)}: {exc}"


class EvalRunner:
    """``with EvalRunner(settings, pm, "brightness") as runner: runner.score(samples, "jpeg75")``."""

    def __init__(
        self,
        settings: Settings,
        pm: pluggy.PluginManager,
        detector: str,
        *,
        cache_dir: Path | None = DEFAULT_CACHE_DIR,
        batch_size: int | None = None,
        progress: bool = False,
        workers: int | None = None,
    ) -> None:
        self.detector = detector
        self.settings = restrict_to(settings, pm, detector)
        self.stats = RunStats()
        self._scorer = Scorer(self.settings, pm)
        self._started = False
        self._batch = batch_size or self.settings.detectors.batch_size
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._reader = SampleReader()
        self._progress = (
            Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                     console=Console(stderr=True))
            if progress else None
        )
        self._cache = ScoreCache(cache_dir / CACHE_FILE if cache_dir else None, detector, self._versions_key())

    @property
    def specs(self) -> list[DetectorSpec]:
        return self._scorer.specs

    @property
    def spec(self) -> DetectorSpec | None:
        """The one detector in single-detector mode."""
        return None if self.detector == FUSED else self._scorer.specs[0]

    @property
    def versions(self) -> dict[str, str]:
        versions = dict(self._scorer.model_versions)
        if self.detector == FUSED:
            versions["policy"] = self._scorer.policy_version
        return versions

    @property
    def calibrations(self) -> dict[str, dict[str, object]]:
        """The calibration each detector's probabilities went through (part of what the numbers mean)."""
        return {spec.name: asdict(spec.calibration) for spec in self._scorer.specs}

    def _versions_key(self) -> str:
        options = self.settings.detectors.options
        if self.detector != FUSED:
            spec = self._scorer.specs[0]
            return json.dumps({"version": spec.version, "options": options.get(spec.name, {})}, sort_keys=True)
        return json.dumps(
            {
                "models": self._scorer.model_versions,
                "options": {s.name: options.get(s.name, {}) for s in self._scorer.specs},
                "calibration": {s.name: [s.calibration.scale, s.calibration.bias] for s in self._scorer.specs},
                "fusion": self.settings.fusion.model_dump(mode="json"),
                "policy": self._scorer.policy_version,
            },
            sort_keys=True,
        )

    def __enter__(self) -> EvalRunner:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._started:
            self._scorer.close()
        self._reader.close()
        self._cache.close()

    def score(self, samples: Sequence[Sample], perturbation: str = NONE) -> list[ScoredSample]:
        """Every sample under ``perturbation``, in order; errors and abstentions included."""
        results: list[ScoredSample] = []
        t0 = time.perf_counter()
        before = RunStats(**vars(self.stats))
        with self._task(perturbation, len(samples)) as advance, ThreadPoolExecutor(self._workers) as pool:
            for lo in range(0, len(samples), self._batch):
                batch = samples[lo : lo + self._batch]
                results.extend(self._score_batch(batch, perturbation, pool))
                advance(len(batch))
        log.info(
            "eval.scored", scorer=self.detector, perturbation=perturbation, samples=len(samples),
            cache_hits=self.stats.cache_hits - before.cache_hits, errors=self.stats.errors - before.errors,
            seconds=round(time.perf_counter() - t0, 3),
        )
        return results

    @contextmanager
    def _task(self, perturbation: str, total: int) -> Iterator[Callable[[int], None]]:
        if self._progress is None:
            yield lambda n: None
            return
        task = self._progress.add_task(f"{self.detector} {perturbation}", total=total)
        yield lambda n: self._progress.advance(task, n)  # type: ignore[union-attr]

    def _score_batch(self, batch: Sequence[Sample], perturbation: str, pool: ThreadPoolExecutor) -> list[ScoredSample]:
        tag = cache_tag(perturbation)
        done: dict[int, ScoredSample] = {}
        read: dict[int, tuple[str, bytes]] = {}
        for i, sample in enumerate(batch):
            try:
                data = self._reader.read(sample)  # sequential: a tar archive has one file position
            except SampleReadError as exc:
                done[i] = ScoredSample(sample, perturbation, None, error=f"ReadError: {exc}")
                continue
            read[i] = (hashlib.sha256(data).hexdigest(), data)
        hits = self._cache.get_many([(sha, tag) for sha, _ in read.values()])
        pending: list[int] = []
        for i, value in zip(list(read), hits, strict=True):
            if value is MISSING:
                pending.append(i)
            else:
                done[i] = self._result(batch[i], perturbation, value, cached=True)  # type: ignore[arg-type]
        if pending:
            self._score_pending(batch, perturbation, pending, read, done, pool)
        results = [done[i] for i in range(len(batch))]
        for r in results:
            self.stats.cache_hits += r.cached
            self.stats.errors += r.error is not None
            self.stats.abstained += r.abstained
        return results

    def _score_pending(
        self, batch: Sequence[Sample], perturbation: str, pending: list[int], read: dict[int, tuple[str, bytes]],
        done: dict[int, ScoredSample], pool: ThreadPoolExecutor,
    ) -> None:
        limits = self.settings.intake

        def prepare(i: int) -> bytes | str:
            try:
                return perturb(perturbation, read[i][1], limits)
            except Exception as exc:  # noqa: BLE001 - one odd image must not end the run
                return _error(exc)

        prepared = dict(zip(pending, pool.map(prepare, pending), strict=True))
        jobs: list[tuple[int, ImageJob]] = []
        for i, data in prepared.items():
            if isinstance(data, str):
                done[i] = ScoredSample(batch[i], perturbation, None, error=data)
            else:
                jobs.append((i, ImageJob(key=str(i), data=data)))
        if not jobs:
            return
        if not self._started:
            self._scorer.start()
            self._started = True
        try:
            outcomes = self._scorer.score([job for _, job in jobs])
        except Exception as exc:  # noqa: BLE001 - a bug on one batch must not end a long evaluation
            log.exception("eval.batch_failed", perturbation=perturbation)
            for i, _ in jobs:
                done[i] = ScoredSample(batch[i], perturbation, None, error=f"InternalError: {_error(exc)}")
            return
        fresh: list[tuple[str, str, float | None]] = []
        for (i, _), outcome in zip(jobs, outcomes, strict=True):
            value, error = self._value(outcome)
            self.stats.scored += 1
            if error is not None:
                done[i] = ScoredSample(batch[i], perturbation, None, error=error)
                continue
            fresh.append((read[i][0], cache_tag(perturbation), value))
            done[i] = self._result(batch[i], perturbation, value, cached=False)
        self._cache.put_many(fresh)

    def _value(self, outcome: Outcome) -> tuple[float | None, str | None]:
        """What the cache stores for an outcome (raw logit, or fused probability), or the error."""
        if outcome.error is not None:
            return None, _error(outcome.error)
        verdict = outcome.verdict
        if verdict is None:
            return None, "InternalError: no verdict"
        failed = [f"{s.detector}: {s.error}" for s in verdict.scores if s.error]
        if failed:
            return None, "DetectorError: " + "; ".join(failed)
        if self.detector == FUSED:
            return verdict.probability, None
        score = next((s for s in verdict.scores if s.detector == self.detector), None)
        if score is None:
            return None, f"InternalError: no score from {self.detector}"
        # The score keeps the model's own logit: no undoing a calibration (which a zero scale cannot undo).
        return score.raw_logit, None

    def _result(self, sample: Sample, perturbation: str, value: float | None, *, cached: bool) -> ScoredSample:
        if value is None or self.detector == FUSED:
            return ScoredSample(sample, perturbation, value, None, cached=cached)
        # Both fresh and cached scores go through the same arithmetic, so re-runs agree to the last bit.
        probability = self._scorer.specs[0].calibration.probability(value)
        return ScoredSample(sample, perturbation, probability, value, cached=cached)
