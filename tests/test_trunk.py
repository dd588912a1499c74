"""Shared trunks: detectors on one backbone run its frozen blocks once per batch, with the scores their own
whole models give.

On a tiny CLIP the tests make (4 blocks), with built-in detectors whose weights the tests make too: univfd
(reading every block's class token, as shipped; one test also with a head on the output embedding), pin-clip
(adapters on blocks 2-3) and mpft (adapters on block 3 only), a third-party detector branching at block 1,
and a detector with no trunk beside them. Then the shipped detectors on the real backbone (made by the
set-up's `backbone fetch`, as tests/test_finetuned_shipped.py uses it): the same scores, shared or not,
within 1e-4.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from images import encode, noise
from PIL import Image
from structlog.testing import capture_logs

from streamguard import CLIP_TRUNK, BranchContext, DetectorSpec, InputContract, TrunkSpec, hookimpl
from streamguard.backbone import ClipImageEncoder, load_backbone, vit
from streamguard.backbone.lora import LoraConfig
from streamguard.backends.torch_trunk import ClipTrunk
from streamguard.builtin.cliphead import CONTRACT
from streamguard.builtin.cliphead.model import LinearProbe
from streamguard.builtin.mpft.plugin import DETECTOR as MPFT
from streamguard.builtin.pinclip.plugin import DETECTOR as PINCLIP
from streamguard.builtin.univfd.plugin import DETECTOR as UNIVFD
from streamguard.config import BackboneSettings, IntakeSettings, Settings, load_settings
from streamguard.detectors.spec import CLASS_TOKENS, DetectorInput, LoadContext
from streamguard.detectors.trunk import MAX_PENDING_BATCHES, SharedTrunk
from streamguard.intake.contract import JPEG_QUALITY, as_jpeg, prepare_views, with_views
from streamguard.intake.inset import INSET_VERSION, find_inset
from streamguard.intake.decode import decode_image
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import ImageJob, Scorer
from streamguard.training.artifacts import save_detector, save_probe
from streamguard.training.lora import LoraLinear, add_lora, lora_state
from test_training_units import tiny_clip

CLIP_PLUGINS = ("builtin-univfd", "builtin-pinclip", "builtin-mpft")


def _scene(seed: int, size: int = 200) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + seed)], axis=-1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def _jobs(n: int) -> list[ImageJob]:
    return [ImageJob(f"img-{i}", encode(_scene(i) if i % 2 else noise((180, 240), seed=i), "PNG")) for i in range(n)]


def _adapted(encoder: ClipImageEncoder, out: Path, blocks: Sequence[int], lora: LoraConfig, seed: int) -> Path:
    """A fine-tuned detector's files with random (non-zero) adapters on ``blocks`` and a random head."""
    model = tiny_clip(0)  # a fresh copy: the adapters are made on the same weights as ``encoder``'s
    add_lora(model, blocks, lora, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.2)
    head = LinearProbe(encoder.embed_dim)
    torch.nn.init.normal_(head.linear.weight, std=1.0, generator=generator)
    save_detector(out, {"lora": lora_state(model), "head": head.state_dict()}, lora, encoder, {"test": True})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trunk")
    tiny_clip(0).save_pretrained(root / "clip")
    encoder = load_backbone(BackboneSettings(checkpoint=root / "clip"))
    probe = LinearProbe(encoder.embed_dim)
    torch.nn.init.normal_(probe.linear.weight, std=1.0, generator=torch.Generator().manual_seed(1))
    save_probe(probe, root / "univfd-embedding", {"test": True})
    probe = LinearProbe(vit.num_layers(encoder) * encoder.hidden_size)
    torch.nn.init.normal_(probe.linear.weight, std=1.0, generator=torch.Generator().manual_seed(4))
    save_probe(probe, root / "univfd", {"test": True}, reads=CLASS_TOKENS)
    _adapted(encoder, root / "pin-clip", [2, 3], LoraConfig(rank=4), seed=2)
    _adapted(encoder, root / "mpft", [3], LoraConfig(rank=2, targets=("k_proj", "v_proj", "out_proj")), seed=3)
    names = ("univfd", "univfd-embedding", "pin-clip", "mpft")
    return {"clip": root / "clip", **{name: root / name for name in names}}


def _settings(tiny: dict[str, Path], shared: bool, deny: Sequence[str] = ("provenance",),
              batch_size: int = 16, univfd: str = "univfd") -> Settings:
    # The resized view for all three, whatever a release makes the default: one contract, one trunk pass a batch;
    # the views have a test of their own.
    options = {name: {"weights_dir": str(tiny[name]), "views": "resize"} for name in ("univfd", "pin-clip", "mpft")}
    options["univfd"]["weights_dir"] = str(tiny[univfd])
    # mpft is opt-in: enabled, so that two adapted branches (pin-clip, on by default, and mpft) share the trunk
    # with univfd.
    return load_settings(backbone={"checkpoint": str(tiny["clip"])},
                         plugins={"deny": list(deny), "enable": ["builtin-pinclip", "builtin-mpft"]},
                         detectors={"options": options, "shared_trunk": shared, "timeout_s": None,
                                    "batch_size": batch_size})


def _raw(scorer: Scorer, jobs: Sequence[ImageJob]) -> dict[str, list[float]]:
    """Each detector's raw logits over ``jobs``, by detector."""
    out: dict[str, list[float]] = {}
    for outcome in scorer.score(jobs):
        assert outcome.verdict is not None, outcome.error
        for score in outcome.verdict.scores:
            assert score.error is None, score
            if score.raw_logit is not None:
                out.setdefault(score.detector, []).append(score.raw_logit)
    return out


class _BlockCounter:
    """Counts encoder block passes (per image batch) by wrapping every CLIP encoder layer's forward."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.passes = 0
        self._lock = threading.Lock()
        layer_class = type(tiny_clip(0).vision_model.encoder.layers[0])
        original = layer_class.forward

        def counted(layer: Any, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.passes += 1
            return original(layer, *args, **kwargs)

        monkeypatch.setattr(layer_class, "forward", counted)


@pytest.mark.parametrize("univfd", ["univfd", "univfd-embedding"])
def test_shared_trunk_gives_the_separate_models_scores_with_fewer_block_passes(
        tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch, univfd: str) -> None:
    jobs = _jobs(5)
    counter = _BlockCounter(monkeypatch)
    apart, together = _settings(tiny, False, univfd=univfd), _settings(tiny, True, univfd=univfd)
    with Scorer(apart, build_plugin_manager(apart.plugins)) as separate:
        assert all(r.load_error is None for r in separate.runners)
        counter.passes = 0
        expected = _raw(separate, jobs)
        separate_passes = counter.passes
    with Scorer(together, build_plugin_manager(together.plugins)) as shared:
        assert all(r.load_error is None for r in shared.runners)
        counter.passes = 0
        got = _raw(shared, jobs)
        shared_passes = counter.passes
    assert set(got) == {"univfd", "pin-clip", "mpft", "brightness"}  # brightness has no trunk: runs as before
    for name, logits in expected.items():
        np.testing.assert_allclose(got[name], logits, rtol=0, atol=1e-5, err_msg=name)
    # One batch: 3 x 4 blocks apart; shared, the trunk's 4 plus pin-clip's 2 and mpft's 1 (the class tokens
    # are gathered on the trunk's own pass).
    assert (separate_passes, shared_passes) == (12, 7)


def test_the_trunk_runs_once_per_batch_and_heads_read_their_branch_point(
        tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, tuple[int, ...]]] = []
    run = ClipTrunk.run

    def recorded(self: ClipTrunk, pixels: Sequence[np.ndarray], blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        calls.append((len(pixels), tuple(blocks)))
        return run(self, pixels, blocks)

    monkeypatch.setattr(ClipTrunk, "run", recorded)
    settings = _settings(tiny, shared=True, batch_size=3)
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        _raw(scorer, _jobs(7))
    # Chunks of 3, 3 and 1 images, each through the trunk once, to blocks 2 (pin-clip), 3 (mpft) and every
    # block's class token (univfd).
    points = (2, 3, CLASS_TOKENS)
    assert sorted(calls) == [(1, points), (3, points), (3, points)]


class _ThirdParty:
    """A plugin detector branching off the built-ins' trunk at block 1: the class token's mean, scaled."""

    seen: list[torch.Tensor]

    def __init__(self) -> None:
        self.seen = []

    def head(self, ctx: BranchContext) -> torch.nn.Module:
        assert isinstance(ctx.trunk, ClipImageEncoder) and ctx.options == {"gain": 3.0}
        seen = self.seen

        class Head(torch.nn.Module):
            def forward(self, hidden: torch.Tensor) -> torch.Tensor:
                seen.append(hidden.clone())
                return 3.0 * hidden[:, 0].mean(dim=-1)

        return Head()

    @hookimpl
    def register_detectors(self, register) -> None:  # type: ignore[no-untyped-def]
        def whole(ctx: Any) -> Any:
            raise AssertionError("on a shared trunk the whole model is not loaded")

        register(DetectorSpec(name="third", version="t-1", load=whole, contract=CONTRACT,
                              trunk=TrunkSpec(backbone=CLIP_TRUNK, branch_block=1, load_head=self.head)))


def test_a_third_party_detector_branches_off_the_same_trunk(tiny: dict[str, Path]) -> None:
    settings = _settings(tiny, shared=True).model_copy(deep=True)
    settings.detectors.options["third"] = {"gain": 3.0}
    pm = build_plugin_manager(settings.plugins)
    plugin = _ThirdParty()
    pm.register(plugin, name="third-party")
    jobs = _jobs(2)
    with Scorer(settings, pm) as scorer:
        got = _raw(scorer, jobs)
        pixels = torch.from_numpy(np.stack([i.pixels for i in _prepared(scorer, jobs)]))  # type: ignore[misc]
    encoder = load_backbone(settings.backbone)
    with torch.inference_mode():
        expected = vit.run_blocks(encoder, vit.tokens(encoder, pixels), 0, 1)
    (hidden,) = plugin.seen
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["third"], (3.0 * expected[:, 0].mean(dim=-1)).tolist(), atol=1e-6)


def _prepared(scorer: Scorer, jobs: Sequence[ImageJob]) -> list[DetectorInput]:
    from streamguard.intake import prepare

    images = [o.image for o in scorer.decode(jobs)]
    return [DetectorInput(prepare(image, CONTRACT), image) for image in images]  # type: ignore[arg-type]


def test_a_head_that_fails_to_load_costs_only_its_detector(tiny: dict[str, Path], tmp_path: Path) -> None:
    wider = tmp_path / "wider"
    save_probe(LinearProbe(99), wider, {})
    settings = _settings(tiny, shared=True).model_copy(deep=True)
    settings.detectors.options["univfd"] = {"weights_dir": str(wider)}
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        errors = {r.spec.name: r.load_error for r in scorer.runners}
        assert errors["univfd"] is not None and "retrain it with `streamguard train univfd`" in errors["univfd"]
        assert errors["pin-clip"] is None and errors["mpft"] is None
        (outcome,) = scorer.score(_jobs(1))
    scores = {s.detector: s for s in outcome.verdict.scores}  # type: ignore[union-attr]
    assert scores["univfd"].error is not None and scores["mpft"].error is None and scores["pin-clip"].error is None


def test_built_in_detectors_declare_where_they_branch(tiny: dict[str, Path]) -> None:
    settings = _settings(tiny, shared=True)
    specs = {d.name: d.spec(settings) for d in (UNIVFD, PINCLIP, MPFT)}
    assert {name: (s.trunk.backbone, s.trunk.branch_block) for name, s in specs.items()  # type: ignore[union-attr]
            if s is not None and s.trunk is not None} == {
        "univfd": (CLIP_TRUNK, CLASS_TOKENS), "pin-clip": (CLIP_TRUNK, 2), "mpft": (CLIP_TRUNK, 3)}
    embedding = UNIVFD.spec(_settings(tiny, shared=True, univfd="univfd-embedding"))
    assert embedding is not None and embedding.trunk is not None and embedding.trunk.branch_block is None
    with pytest.raises(ValueError, match="cannot be -1"):
        TrunkSpec(backbone=CLIP_TRUNK, branch_block=-1, load_head=lambda ctx: None)
    with pytest.raises(ValueError, match="cannot be 'classes'"):
        TrunkSpec(backbone=CLIP_TRUNK, branch_block="classes", load_head=lambda ctx: None)  # type: ignore[arg-type]


def _univfd_viewed(tiny: dict[str, Path], jobs: Sequence[ImageJob], views: str) -> tuple[
        tuple[dict[str, list[float]], dict[str, str]], tuple[dict[str, list[float]], dict[str, str]]]:
    """(raw logits, versions) of every detector over ``jobs`` with univfd under ``views``, then with all at the
    resized view, on the shared trunk."""
    out = []
    for view in (views, "resize"):
        settings = _settings(tiny, shared=True).model_copy(deep=True)
        settings.detectors.options["univfd"]["views"] = view
        with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
            out.append((_raw(scorer, jobs), scorer.model_versions))
    return out[0], out[1]


def test_a_detector_configured_for_the_inset_judges_the_photo_a_screenshot_shows(tiny: dict[str, Path]) -> None:
    """``views = "resize-inset"``: a screenshot around a photo gets the logit the photo alone gets, and its
    version names the view with the inset rule's version; a plain photo scores as it did."""
    from test_inset import photo, screen

    shown = photo((1080, 900), seed=7)
    shot = screen(shown, (0, 420))
    box = find_inset(shot)
    assert box is not None
    jobs = [ImageJob("shot", encode(shot, "PNG")), ImageJob("inside", encode(shot.crop(box), "PNG")),
            ImageJob("plain", encode(_scene(1, 320), "PNG"))]
    (got, versions), (before, plain_versions) = _univfd_viewed(tiny, jobs, "resize-inset")
    assert versions["univfd"] == f"{plain_versions['univfd']}@resize-inset{INSET_VERSION}"
    np.testing.assert_allclose(got["univfd"][0], before["univfd"][1], rtol=0, atol=1e-5)  # the photo's logit
    assert abs(before["univfd"][0] - before["univfd"][1]) > 1e-3  # which the whole screen does not get
    np.testing.assert_allclose(got["univfd"][2], before["univfd"][2], rtol=0, atol=1e-5)


def test_a_detector_configured_for_jpeg_views_judges_the_upload_as_a_jpeg(tiny: dict[str, Path]) -> None:
    """``views = "resize-jpeg"``: an upload gets the logit its pixels get once encoded as a q75 JPEG and
    decoded (uploaded as those very pixels, losslessly); its version names the view and the quality."""
    upload = noise((448, 336), seed=11)  # under the encoding's scale: encoded as it is
    encoded = as_jpeg(upload, JPEG_QUALITY)
    jobs = [ImageJob("upload", encode(upload, "PNG")), ImageJob("encoded", encode(encoded, "PNG"))]
    (got, versions), (before, plain_versions) = _univfd_viewed(tiny, jobs, "resize-jpeg")
    assert versions["univfd"] == f"{plain_versions['univfd']}@resize-jpeg{JPEG_QUALITY}"
    np.testing.assert_allclose(got["univfd"][0], before["univfd"][1], rtol=0, atol=1e-5)
    assert abs(before["univfd"][0] - before["univfd"][1]) > 1e-3  # the encode moved the logit


def test_a_detector_configured_for_the_mirror_image_scores_both_sides_the_same(tiny: dict[str, Path]) -> None:
    """``views = "resize-flip"``: a picture and its mirror image get the same logit, the mean of the two logits
    the resized view alone gives them; its version names the view."""
    # Square, so the centre crop has no odd pixel to put on one side; smooth on one side, noise on the other.
    scene = _scene(3, 320)
    scene.paste(noise((320, 160), seed=3), (160, 0))
    jobs = [ImageJob("scene", encode(scene, "PNG")),
            ImageJob("mirror", encode(scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG"))]
    (got, versions), (before, plain_versions) = _univfd_viewed(tiny, jobs, "resize-flip")
    assert versions["univfd"] == f"{plain_versions['univfd']}@resize-flip"
    assert abs(before["univfd"][0] - before["univfd"][1]) > 1e-3  # the resized view alone tells them apart
    both = (before["univfd"][0] + before["univfd"][1]) / 2
    np.testing.assert_allclose(got["univfd"], [both, both], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["mpft"], before["mpft"], rtol=0, atol=1e-5)


def test_a_detector_configured_for_native_crops_scores_their_mean_logit(tiny: dict[str, Path]) -> None:
    """``detectors.options.<name>.views``: univfd on two native crops and the resized whole view, on the shared
    trunk, gives the mean of its own whole model's logits over those views; its version says so, and a
    detector left at ``resize`` scores as before on the same trunk."""
    jobs = [ImageJob(f"big-{i}", encode(_scene(i, 320), "PNG")) for i in range(3)]
    settings = _settings(tiny, shared=True).model_copy(deep=True)
    settings.detectors.options["univfd"]["views"] = "crops2+whole"
    (got, versions), (before, plain_versions) = _univfd_viewed(tiny, jobs, "crops2+whole")
    assert versions["univfd"] == f"{plain_versions['univfd']}@crops2+whole"
    assert versions["mpft"] == plain_versions["mpft"]
    np.testing.assert_allclose(got["mpft"], before["mpft"], rtol=0, atol=1e-5)
    spec = UNIVFD.spec(settings)
    # The views asked for; an image too small for a crop would get its resized view, as the head was trained.
    assert spec is not None and spec.contract == replace(with_views(CONTRACT, "crops2+whole"), small_image="resize")
    assert spec.served_version == plain_versions["univfd"]  # what Triton and the trunk must serve
    model = spec.load(LoadContext())
    try:
        for job, logit in zip(jobs, got["univfd"], strict=True):
            views = prepare_views(decode_image(job.data, IntakeSettings()), spec.contract)
            assert len(views) == 3  # two distinct crops of a 320 px image, then the whole view
            each = model.predict([DetectorInput(v, None) for v in views])  # type: ignore[arg-type]
            assert logit == pytest.approx(float(np.mean(each)), abs=1e-5)
            assert logit != pytest.approx(before["univfd"][jobs.index(job)], abs=1e-3)
    finally:
        model.close()


def test_an_unknown_view_is_refused_with_the_option_named(tiny: dict[str, Path]) -> None:
    settings = _settings(tiny, shared=True).model_copy(deep=True)
    settings.detectors.options["mpft"]["views"] = "crops-2"
    with pytest.raises(ValueError, match=r"detectors\.options\.mpft\.views: views must be resize, cropsN"):
        MPFT.spec(settings)
    with capture_logs() as logs:
        scorer = Scorer(settings, build_plugin_manager(settings.plugins))  # not started: nothing loads
    assert "mpft" not in scorer.model_versions and "univfd" in scorer.model_versions
    (failed,) = [entry for entry in logs if entry["event"] == "plugin.hook_failed"]
    assert failed["plugin"] == "builtin-mpft" and "detectors.options.mpft.views" in failed["error"]


class _FakeTrunk:
    def __init__(self) -> None:
        self.runs = 0

    def run(self, pixels: Sequence[np.ndarray], blocks: Sequence[int]) -> dict[int, Any]:
        self.runs += 1
        return {block: [block] * len(pixels) for block in blocks}

    def close(self) -> None:
        pass


def _batch(n: int) -> list[DetectorInput]:
    return [DetectorInput(np.zeros(1, np.float32), None) for _ in range(n)]  # type: ignore[arg-type]


def test_a_branch_that_never_reads_does_not_pin_batches() -> None:
    trunk = _FakeTrunk()
    shared = SharedTrunk("fake", trunk)  # type: ignore[arg-type]
    shared.add_branch(2, CONTRACT)
    shared.add_branch(4, CONTRACT)  # this branch never reads (say its breaker is open)
    batches = [_batch(2) for _ in range(MAX_PENDING_BATCHES + 3)]
    for batch in batches:
        assert shared.hidden(batch, 2, CONTRACT) == [2, 2]
    assert trunk.runs == len(batches) and len(shared._pending) == MAX_PENDING_BATCHES
    # Every branch reads: computed once, then forgotten.
    shared.add_branch(2, CONTRACT)
    batch = _batch(1)
    for block in (2, 4, 2):
        shared.hidden(batch, block, CONTRACT)
    assert trunk.runs == len(batches) + 1 and (CONTRACT, id(batch[0].pixels)) not in shared._pending


def test_a_trunk_failure_is_every_branchs_without_running_it_again() -> None:
    class Failing(_FakeTrunk):
        def run(self, pixels: Sequence[np.ndarray], blocks: Sequence[int]) -> dict[int, Any]:
            self.runs += 1
            raise RuntimeError("out of memory")

    trunk = Failing()
    shared = SharedTrunk("fake", trunk)  # type: ignore[arg-type]
    shared.add_branch(2, CONTRACT)
    shared.add_branch(4, CONTRACT)
    batch = _batch(2)
    for block in (2, 4):
        with pytest.raises(RuntimeError, match="out of memory"):
            shared.hidden(batch, block, CONTRACT)
    assert trunk.runs == 1 and not shared._pending


def test_branches_with_another_input_get_their_own_pass_to_their_own_blocks() -> None:
    trunk = _FakeTrunk()
    shared = SharedTrunk("fake", trunk)  # type: ignore[arg-type]
    other = InputContract(size=336)
    shared.add_branch(2, CONTRACT)
    shared.add_branch(4, CONTRACT)
    shared.add_branch(1, other)
    batch = _batch(3)
    assert shared.hidden(batch, 1, other) == [1, 1, 1]  # its own pass, to block 1 only: read, forgotten
    assert trunk.runs == 1 and not shared._pending
    shared.hidden(batch, 2, CONTRACT)
    shared.hidden(batch, 4, CONTRACT)
    assert trunk.runs == 2 and not shared._pending


def _shipped_settings(shared: bool) -> Settings:
    return load_settings(plugins={"allow": ["builtin-fusion", "builtin-policy", *CLIP_PLUGINS], "deny": []},
                         detectors={"shared_trunk": shared, "timeout_s": None})


@pytest.fixture(scope="module")
def shipped_jobs() -> Iterator[list[ImageJob]]:
    yield [ImageJob("scene", encode(_scene(1, 256), "PNG")), ImageJob("noise", encode(noise((300, 200)), "JPEG")),
           ImageJob("small", encode(_scene(5, 96), "JPEG", quality=80))]


def test_shipped_detectors_score_the_same_on_the_shared_trunk(shipped_jobs: list[ImageJob]) -> None:
    """The real backbone and the shipped weights: every default CLIP detector within 1e-4 of its own model."""
    results = {}
    for shared in (False, True):
        settings = _shipped_settings(shared)
        with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
            assert {r.spec.name for r in scorer.runners} == {"univfd", "pin-clip", "mpft"}
            assert all(r.load_error is None for r in scorer.runners)
            results[shared] = _raw(scorer, shipped_jobs)
    for name in ("univfd", "pin-clip", "mpft"):
        np.testing.assert_allclose(results[True][name], results[False][name], rtol=0, atol=1e-4, err_msg=name)
