from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from streamguard.config import DetectorSettings
from streamguard.detectors.breaker import CircuitBreaker
from streamguard.detectors.runner import DetectorRunner
from streamguard.detectors.spec import Calibration, DetectorInput, DetectorSpec, sigmoid

ITEM = DetectorInput(pixels=None, image=None)  # type: ignore[arg-type]


class Scripted:
    """A backend whose behaviour each test scripts: logits, an exception, or a hang."""

    def __init__(self, logits: Sequence[float | None] = (1.0,), exc: Exception | None = None,
                 hang: threading.Event | None = None) -> None:
        self.logits, self.exc, self.hang, self.calls = list(logits), exc, hang, 0

    def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
        self.calls += 1
        if self.hang is not None:
            self.hang.wait(5)
        if self.exc is not None:
            raise self.exc
        return self.logits[: len(batch)] if len(self.logits) >= len(batch) else self.logits

    def close(self) -> None:
        pass


def _runner(backend: Scripted, calibration: Calibration = Calibration(), **settings: float) -> DetectorRunner:
    spec = DetectorSpec(name="d", version="v1", load=lambda ctx: backend, contract=None, calibration=calibration)
    runner = DetectorRunner(spec, DetectorSettings(**settings))  # type: ignore[arg-type]
    runner.start()
    return runner


def _call(runner: DetectorRunner, n: int = 1):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    return runner.collect(runner.submit([ITEM] * n), n, started)


def test_scores_are_calibrated_logits() -> None:
    runner = _runner(Scripted([2.0, None]), Calibration(scale=0.5, bias=-1.0))
    ok, abstained = _call(runner, 2)
    assert ok.logit == pytest.approx(0.0) and ok.probability == pytest.approx(0.5)
    assert ok.raw_logit == 2.0  # the model's own logit rides along, for evaluation and calibration
    assert ok.error is None and ok.version == "v1"
    assert abstained.logit is None and abstained.raw_logit is None and abstained.error is None


def test_a_sharp_calibration_of_a_confident_model_does_not_overflow() -> None:
    runner = _runner(Scripted([1e4, -1e4]), Calibration(scale=1e4, bias=0.0))
    high, low = _call(runner, 2)
    assert (high.probability, low.probability) == (1.0, 0.0) and high.error is None and low.error is None


def test_exception_becomes_error_score() -> None:
    runner = _runner(Scripted(exc=RuntimeError("cuda oom")))
    (score,) = _call(runner)
    assert score.logit is None and "RuntimeError: cuda oom" in (score.error or "")
    assert runner.stats.errors == 1


def test_wrong_number_of_logits_is_an_error() -> None:
    (a, b) = _call(_runner(Scripted([1.0])), 2)
    assert a.error == b.error == "returned 1 logits for 2 images"


def test_non_finite_logit_is_an_error_for_that_image() -> None:
    nan, ok = _call(_runner(Scripted([float("nan"), 1.0])), 2)
    assert nan.error == "non-finite logit" and ok.error is None


def test_timeout_then_breaker_opens() -> None:
    release = threading.Event()
    backend = Scripted(hang=release)
    runner = _runner(backend, timeout_s=0.05, breaker_failures=2, breaker_reset_s=60)
    try:
        first, second = _call(runner)[0], _call(runner)[0]
        assert "timed out" in (first.error or "") and "timed out" in (second.error or "")
        assert runner.stats.timeouts == 2 and not runner.ready
        (third,) = _call(runner)
        assert third.error == "circuit open after repeated failures"
        assert runner.stats.rejected_open == 1
    finally:
        release.set()
        runner.close()


def test_load_failure_is_reported_on_every_call() -> None:
    def explode(ctx):  # type: ignore[no-untyped-def]
        raise FileNotFoundError("weights.safetensors")

    runner = DetectorRunner(DetectorSpec(name="d", version="1", load=explode, contract=None), DetectorSettings())
    runner.start()
    assert not runner.ready and "weights.safetensors" in (runner.load_error or "")
    (score,) = _call(runner)
    assert score.error is not None and score.error.startswith("not loaded")


def test_breaker_half_opens_after_reset_and_closes_on_success() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_s=10, clock=lambda: now[0])
    breaker.record(False)
    assert breaker.allow()
    breaker.record(False)
    assert breaker.is_open and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()  # the trial call
    assert not breaker.allow()  # only one trial at a time
    breaker.record(True)
    assert not breaker.is_open and breaker.allow()


def test_sigmoid_is_stable() -> None:
    assert sigmoid(1000.0) == 1.0 and sigmoid(-1000.0) == 0.0 and sigmoid(0.0) == 0.5


def test_one_sigmoid_for_values_and_arrays() -> None:
    z = np.array([-1e6, -30.0, -1.5, 0.0, 0.25, 30.0, 1e6])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no overflow, no nan
        array = sigmoid(z)
    assert array.tolist() == pytest.approx([sigmoid(float(v)) for v in z], rel=1e-15, abs=0.0)
    assert array[0] == 0.0 and array[-1] == 1.0 and array[3] == 0.5
    calibration = Calibration(scale=2.0, bias=-1.0)
    assert calibration.probability(0.5) == 0.5
    assert calibration.probability(np.array([0.5, 1e9])).tolist() == [0.5, 1.0]


def test_the_timeout_is_per_call_when_a_batch_takes_several() -> None:
    """Three calls queued at once on the detector's thread, each under the timeout but together over it:
    none times out. A hung call still ends the calls behind it, one timeout each."""

    class Slow:
        def predict(self, batch: Sequence[DetectorInput]) -> list[float]:
            time.sleep(0.3)
            return [1.0] * len(batch)

        def close(self) -> None:
            pass

    runner = _runner(Slow(), timeout_s=0.5)  # type: ignore[arg-type]
    try:
        started = time.perf_counter()
        futures = [runner.submit([ITEM]) for _ in range(3)]
        scores = [runner.collect(f, 1, started, queued=k)[0] for k, f in enumerate(futures)]
        assert [s.error for s in scores] == [None, None, None] and runner.stats.timeouts == 0
    finally:
        runner.close()
    release = threading.Event()
    runner = _runner(Scripted(hang=release), timeout_s=0.1, breaker_failures=10)
    try:
        started = time.perf_counter()
        futures = [runner.submit([ITEM]) for _ in range(2)]
        scores = [runner.collect(f, 1, started, queued=k)[0] for k, f in enumerate(futures)]
        assert all("timed out" in (s.error or "") for s in scores) and runner.stats.timeouts == 2
    finally:
        release.set()
        runner.close()


def test_no_timeout_waits_for_the_model() -> None:
    release = threading.Event()
    runner = _runner(Scripted([3.0], hang=release), timeout_s=None)  # type: ignore[arg-type]
    threading.Timer(0.5, release.set).start()
    started = time.perf_counter()
    (score,) = _call(runner)
    assert score.error is None and score.logit == pytest.approx(3.0)
    assert time.perf_counter() - started >= 0.45
    assert runner.stats.timeouts == 0
