"""The evaluation runner on the real Scorer and the test ``brightness`` detector: scores, errors, the cache."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
from pluggy import PluginManager

from streamguard import Calibration, DetectorInput, DetectorSpec, InputContract, hookimpl
from streamguard.config import Settings, load_settings
from streamguard.detectors.calibration import sigmoid
from streamguard.evaluation import EvalConfig, load_samples, run_evaluation
from streamguard.evaluation.runner import FUSED, EvalRunner, UnknownDetector
from streamguard.plugins import build_plugin_manager
from test_eval_datasets import BRIGHT, DARK, cifake_tar, labelled_dirs, write

GAIN = 10.0  # the brightness detector's default


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "simple"
    labelled_dirs(root, "real", "fake", 4)
    write(root / "fake" / "broken.jpg", b"\xff\xd8\xff\xe0 truncated")
    return root


def test_single_detector_scores_raw_logits_and_errors(
    data: Path, tmp_path: Path, settings: Settings, pm: PluginManager
) -> None:
    samples = load_samples([data, cifake_tar(tmp_path / "cifake.tar", 3)])
    with EvalRunner(settings, pm, "brightness", cache_dir=tmp_path / "cache") as runner:
        assert [s.name for s in runner.specs] == ["brightness"]  # provenance denied for this run
        results = runner.score(samples)
    assert [r.sample for r in results] == samples
    broken = [r for r in results if r.sample.id.endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0].error.startswith("CorruptImage:") and broken[0].score is None
    ok = [r for r in results if r.error is None]
    assert len(ok) == len(samples) - 1
    for r in ok:
        expected = GAIN * ((BRIGHT if r.sample.label else DARK) - 0.5)
        assert r.logit == pytest.approx(expected, abs=0.3)
        assert r.score == pytest.approx(1 / (1 + math.exp(-r.logit)))
    assert runner.stats.errors == 1 and runner.stats.cache_hits == 0


def test_cache_gives_identical_scores_and_is_keyed_by_options(
    data: Path, tmp_path: Path, settings: Settings, pm: PluginManager
) -> None:
    samples = load_samples([data])
    cache = tmp_path / "cache"
    with EvalRunner(settings, pm, "brightness", cache_dir=cache) as first:
        a = first.score(samples, "jpeg75")
    with EvalRunner(settings, pm, "brightness", cache_dir=cache) as second:
        b = second.score(samples, "jpeg75")
        assert second.stats.cache_hits == len(samples) - 1 and second.stats.scored == 0
        c = second.score(samples, "blur1")  # another perturbation is another key
        assert second.stats.cache_hits == len(samples) - 1
    assert [(r.score, r.logit, r.error) for r in a] == [(r.score, r.logit, r.error) for r in b]
    assert all(r.cached for r in b if r.error is None) and not any(r.cached for r in c)
    steep = load_settings(detectors={"options": {"brightness": {"gain": 200.0}}})
    with EvalRunner(steep, build_plugin_manager(steep.plugins), "brightness", cache_dir=cache) as third:
        d = third.score(samples, "jpeg75")
        assert third.stats.cache_hits == 0
    for before, after in zip(a, d, strict=True):
        if before.error is None:
            assert after.logit == pytest.approx(20 * before.logit, rel=1e-4)


def test_fused_uses_the_verdict_probability(
    data: Path, tmp_path: Path, settings: Settings, pm: PluginManager
) -> None:
    samples = load_samples([data])
    with EvalRunner(settings, pm, FUSED, cache_dir=None) as runner:
        assert set(runner.versions) == {"brightness", "provenance", "policy"}
        results = runner.score(samples)
    ok = [r for r in results if r.error is None]
    # provenance abstains on these metadata-free images, so the fused score is brightness's alone.
    assert all(r.logit is None and r.score is not None for r in ok)
    assert all((r.score > 0.5) == bool(r.sample.label) for r in ok)


def test_unknown_detector(settings: Settings, pm: PluginManager) -> None:
    with pytest.raises(UnknownDetector, match="available: brightness, provenance"):
        EvalRunner(settings, pm, "nope", cache_dir=None)


def test_run_evaluation_in_process(
    data: Path, tmp_path: Path, settings: Settings, pm: PluginManager
) -> None:
    config = EvalConfig(data=(str(data),), detector="brightness", perturbations=("jpeg50",), cache_dir=None)
    result = run_evaluation(config, settings, pm)
    assert list(result.metrics) == ["none", "jpeg50", "normalized"]
    assert result.metrics["none"].overall.auc == 1.0
    assert result.metrics["normalized"].overall.auc == 1.0
    assert result.normalization_gap is not None and result.normalization_gap["overall"]["auc"] == 0.0
    doc = result.metrics_document()
    assert doc["errors"]["count"] == 3 and doc["errors"]["by_type"] == {"CorruptImage": 3}
    assert doc["counts"]["by_generator"] == {"simple": 5}
    with pytest.raises(ValueError, match="no labelled images found in split 'nope'"):
        run_evaluation(EvalConfig(data=(str(data),), detector="brightness", split="nope", cache_dir=None),
                       settings, pm)


class _Constant:
    """A plugin whose detector says 2.0 about every image, under a calibration that flattens it to 0.3."""

    class Backend:
        def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
            return [2.0] * len(batch)

        def close(self) -> None:
            pass

    @hookimpl
    def register_detectors(self, register) -> None:  # type: ignore[no-untyped-def]
        register(DetectorSpec(name="constant", version="t-1", load=lambda ctx: self.Backend(),
                              contract=InputContract(size=32), calibration=Calibration(scale=0.0, bias=0.3)))


def test_single_detector_reads_the_raw_logit_the_score_carries(
    data: Path, tmp_path: Path, settings: Settings, pm: PluginManager
) -> None:
    # A zero scale cannot be undone from the calibrated logit: the raw logit comes from the score itself.
    pm.register(_Constant(), name="constant-plugin")
    with EvalRunner(settings, pm, "constant", cache_dir=tmp_path / "cache") as runner:
        results = [r for r in runner.score(load_samples([data])) if r.error is None]
    assert results and all(r.logit == 2.0 and r.score == pytest.approx(sigmoid(0.3)) for r in results)
