from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from images import encode, noise, solid
from streamguard import DetectorInput, DetectorSpec, InputContract, hookimpl
from streamguard.config import load_settings
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer
from streamguard_provenance import VERSION as PROVENANCE_VERSION


class Recorder:
    """A backend that records what it was given."""

    def __init__(self) -> None:
        self.batches: list[list[DetectorInput]] = []

    def predict(self, batch: Sequence[DetectorInput]) -> list[float]:
        self.batches.append(list(batch))
        return [0.0] * len(batch)

    def close(self) -> None:
        pass


def _pm_with(*specs: DetectorSpec, **settings_overrides):  # type: ignore[no-untyped-def]
    settings = load_settings(plugins={"allow": ["builtin-fusion", "builtin-policy"]}, **settings_overrides)
    pm = build_plugin_manager(settings.plugins)

    class Plugin:
        @hookimpl
        def register_detectors(self, register):  # type: ignore[no-untyped-def]
            for spec in specs:
                register(spec)

    pm.register(Plugin(), name="inline")
    return settings, pm


def test_verdict_fields(settings, pm) -> None:  # type: ignore[no-untyped-def]
    data = encode(solid(250), "PNG")
    with Scorer(settings, pm) as scorer:
        (outcome,) = scorer.score([ImageJob("evt-1", data)])
    verdict = outcome.verdict
    assert verdict is not None and outcome.error is None
    assert verdict.event_id == "evt-1"
    assert verdict.content_sha256 == hashlib.sha256(data).hexdigest()
    assert verdict.model_versions == {"brightness": "test-1", "provenance": PROVENANCE_VERSION}
    assert verdict.policy_version.startswith("thresholds-1")
    assert {"decode", "detect", "fuse"} <= set(verdict.timings_ms)
    assert verdict.duplicate_of is None


def test_bad_and_good_images_in_one_batch(settings, pm) -> None:  # type: ignore[no-untyped-def]
    with Scorer(settings, pm) as scorer:
        outcomes = scorer.score([ImageJob("a", b""), ImageJob("b", encode(solid(9), "PNG")), ImageJob("c", b"x")])
    assert [type(o.error).__name__ if o.error else o.verdict.label for o in outcomes] == [  # type: ignore[union-attr]
        "EmptyImage", "real", "UnsupportedFormat"]


def test_detectors_get_their_own_contract_and_batches() -> None:
    small, native = Recorder(), Recorder()
    settings, pm = _pm_with(
        DetectorSpec(name="small", version="1", load=lambda ctx: small, contract=InputContract(size=32)),
        DetectorSpec(name="native", version="1", load=lambda ctx: native,
                     contract=InputContract(size=48, fit="crop")),
        detectors={"batch_size": 2},
    )
    jobs = [ImageJob(str(i), encode(noise((100, 80), seed=i), "JPEG")) for i in range(5)]
    with Scorer(settings, pm) as scorer:
        outcomes = scorer.score(jobs)
    assert all(o.verdict is not None for o in outcomes)
    assert [len(b) for b in small.batches] == [2, 2, 1] == [len(b) for b in native.batches]
    assert small.batches[0][0].pixels.shape == (3, 32, 32)  # type: ignore[union-attr]
    assert native.batches[0][0].pixels.shape == (3, 48, 48)  # type: ignore[union-attr]


@pytest.mark.parametrize(("threads", "heavy"), [(1, True), (3, True), (3, False)])
def test_heavy_images_are_decoded_and_prepared_on_the_decode_threads_in_order(
        threads: int, heavy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With threads, images that take long enough to decode go to them (the first batch measures); light
    ones stay on the caller's thread, where a hand-off would cost more than the decode."""
    import threading

    import streamguard.scoring as scoring

    monkeypatch.setattr(scoring, "_PARALLEL_MIN_MS", 0.0 if heavy else 1e9)

    rec = Recorder()
    settings, pm = _pm_with(DetectorSpec(name="small", version="1", load=lambda ctx: rec,
                                         contract=InputContract(size=32)), intake={"decode_threads": threads})
    workers: dict[str, set[str]] = {"decode": set(), "prepare": set()}
    for name, stage in (("decode_image", "decode"), ("_input", "prepare")):
        original = getattr(scoring, name)

        def spy(*args, _original=original, _stage=stage, **kwargs):  # type: ignore[no-untyped-def]
            workers[_stage].add(threading.current_thread().name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(scoring, name, spy)
    sizes = [(40 + 7 * i, 30 + 5 * i) for i in range(6)]
    jobs = [ImageJob(str(i), encode(noise(size, seed=i), "PNG")) for i, size in enumerate(sizes)]
    jobs.insert(3, ImageJob("bad", b"not an image"))
    with Scorer(settings, pm) as scorer:
        scorer.score(jobs[:1])
        workers["decode"].clear(), workers["prepare"].clear()
        outcomes = scorer.score(jobs)
    assert [o.key for o in outcomes] == [j.key for j in jobs]
    assert [type(o.error).__name__ for o in outcomes if o.error] == ["UnsupportedFormat"]
    assert [(i.image.width, i.image.height) for i in rec.batches[1]] == sizes  # type: ignore[union-attr]
    for names in workers.values():
        if threads == 1 or not heavy:
            assert names == {threading.current_thread().name}
        else:
            assert names and all(n.startswith("decode") for n in names)


def test_resize_only_detectors_get_a_reduced_jpeg_decode() -> None:
    rec = Recorder()
    settings, pm = _pm_with(DetectorSpec(name="small", version="1", load=lambda ctx: rec,
                                         contract=InputContract(size=64)))
    with Scorer(settings, pm) as scorer:
        scorer.score([ImageJob("big", encode(noise((1024, 768)), "JPEG"))])
    image = rec.batches[0][0].image
    assert image.reduced and (image.width, image.height) == (1024, 768) and min(image.rgb.size) >= 64


def test_a_failing_detector_does_not_stop_the_verdict() -> None:
    class Broken:
        def predict(self, batch):  # type: ignore[no-untyped-def]
            raise RuntimeError("segfault-ish")

        def close(self) -> None:
            pass

    class Sure:
        def predict(self, batch):  # type: ignore[no-untyped-def]
            return [6.0] * len(batch)

        def close(self) -> None:
            pass

    settings, pm = _pm_with(
        DetectorSpec(name="broken", version="1", load=lambda ctx: Broken(), contract=None),
        DetectorSpec(name="sure", version="1", load=lambda ctx: Sure(), contract=None),
    )
    with capture_logs() as logs, Scorer(settings, pm) as scorer:
        (outcome,) = scorer.score([ImageJob("a", encode(solid(1), "PNG"))])
    verdict = outcome.verdict
    assert verdict is not None and verdict.label == "ai_generated"
    broken = next(s for s in verdict.scores if s.detector == "broken")
    assert broken.error == "RuntimeError: segfault-ish"
    assert any(e["event"] == "detector.failed" and e["detector"] == "broken" for e in logs)


def test_detector_options_reach_the_loader() -> None:
    seen = {}

    def load(ctx):  # type: ignore[no-untyped-def]
        seen.update(ctx.options)
        return Recorder()

    settings, pm = _pm_with(DetectorSpec(name="opt", version="1", load=load, contract=None),
                            detectors={"options": {"opt": {"threshold": 3}}})
    Scorer(settings, pm).start().close()
    assert seen == {"threshold": 3}


def test_no_detectors_means_uncertain() -> None:
    settings, pm = _pm_with()
    with Scorer(settings, pm) as scorer:
        (outcome,) = scorer.score([ImageJob("a", encode(solid(1), "PNG"))])
    assert outcome.verdict is not None and outcome.verdict.label == "uncertain"
    assert outcome.verdict.probability is None


@pytest.mark.parametrize("gain", [10.0, 40.0])
def test_testdetector_uses_the_torch_backend(gain: float) -> None:
    settings = load_settings(detectors={"options": {"brightness": {"gain": gain}}}, plugins={"deny": ["provenance", "builtin-univfd", "builtin-pinclip", "builtin-mpft"]})
    pm = build_plugin_manager(settings.plugins)
    with Scorer(settings, pm) as scorer:
        (outcome,) = scorer.score([ImageJob("a", encode(solid(191), "PNG"))])
    (score,) = outcome.verdict.scores  # type: ignore[union-attr]
    assert score.logit == pytest.approx(gain * (191 / 255 - 0.5), rel=1e-4)
