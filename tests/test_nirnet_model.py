"""The built-in NIRNet detector: its modules on tiny configs, and its files loaded by the plugin and scored
through the real Scorer on a tiny CLIP the tests make (models random but seeded; no trained weights)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from structlog.testing import capture_logs
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from images import encode
from streamguard.backbone import load_backbone
from streamguard.builtin.nirnet.backend import NirnetBackend
from streamguard.builtin.nirnet.files import BRANCHES, CONFIG_FILE, WEIGHTS_FILE, NirnetConfig
from streamguard.builtin.nirnet.model import (
    FrequencyBranch,
    ImprintExtractor,
    NIRNet,
    NoiseBranch,
    load_model,
    log_spectrum,
    save_model,
)
from streamguard.builtin.nirnet.plugin import DETECTOR
from streamguard.config import BackboneSettings, Settings, load_settings
from streamguard.detectors.spec import Calibration, DetectorInput
from streamguard.intake.contract import InputContract, crop_boxes, prepare, prepare_views
from streamguard.intake.decode import DecodedImage
from streamguard.plugins import build_plugin_manager
from streamguard.registry import collect_detectors
from streamguard.scoring import ImageJob, Scorer

EMBED = 16  # the tiny CLIP's projection width
TINY = NirnetConfig(crop_size=32, crops=4, extractor_depth=2, extractor_width=8, branch_width=8, feature_dim=8,
                    spectrum_grid=4, semantic_dim=EMBED, hidden_dim=8)
# The other detectors off: the scores under test are nirnet's alone.
OTHERS = ["brightness", "provenance", "builtin-univfd", "builtin-pinclip", "builtin-mpft", "builtin-credentials"]


def _model(config: NirnetConfig = TINY, seed: int = 0) -> NIRNet:
    torch.manual_seed(seed)
    model = NIRNet(config).eval()
    with torch.no_grad():
        # Default init makes norms 1 and biases 0; perturbed, every parameter shows in the output.
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.25)
    return model


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(9 * x + seed)], axis=-1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=EMBED, num_hidden_layers=2,
                              num_attention_heads=2, patch_size=8, image_size=32, hidden_act="quick_gelu")
    path = tmp_path_factory.mktemp("nirnet-clip") / "clip"
    CLIPVisionModelWithProjection(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_version(clip_dir: Path) -> str:
    return load_backbone(BackboneSettings(checkpoint=clip_dir)).version


def _settings(weights: Path, clip: Path) -> Settings:
    return load_settings(backbone={"checkpoint": str(clip)},
                         plugins={"deny": OTHERS, "enable": ["builtin-nirnet"]},
                         detectors={"options": {"nirnet": {"weights_dir": str(weights)}}, "timeout_s": None})


def _score(settings: Settings, *images: Image.Image) -> list[Any]:
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        (runner,) = scorer.runners
        assert runner.load_error is None, runner.load_error
        outcomes = scorer.score([ImageJob(f"img-{i}", encode(img, "PNG")) for i, img in enumerate(images)])
    scores = []
    for outcome in outcomes:
        assert outcome.verdict is not None, outcome.error
        (score,) = outcome.verdict.scores
        assert score.detector == "nirnet" and score.error is None, score
        scores.append(score)
    return scores


# --- modules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(17, 23), (32, 32), (64, 48), (96, 200)])
def test_extractor_predicts_noise_at_the_native_size(hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    extractor = ImprintExtractor(depth=2, width=8).eval()
    x = torch.rand(2, 3, *hw)
    noise = extractor(x)
    assert noise.shape == x.shape
    torch.testing.assert_close(extractor.denoise(x), x - noise)


def test_extractor_is_local() -> None:
    """Residual CNN of stride 1 under batch norm served in eval mode: a pixel changed far away leaves a noise
    value unchanged (nothing pooled)."""
    torch.manual_seed(0)
    extractor = ImprintExtractor(depth=2, width=8).eval()  # receptive field 2 * (2 + 2) + 1 = 9
    with torch.no_grad():
        for module in extractor.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # trained-looking statistics, not the identity
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 40, 40)
    y = x.clone()
    y[0, :, 39, 39] = 1 - y[0, :, 39, 39]
    a, b = extractor(x), extractor(y)
    torch.testing.assert_close(a[..., :30, :30], b[..., :30, :30])
    assert not torch.allclose(a[..., 35:, 35:], b[..., 35:, 35:])


def test_log_spectrum_is_centred_log_magnitude() -> None:
    flat = torch.full((1, 3, 16, 20), 0.5)
    spectrum = log_spectrum(flat)
    assert spectrum.shape == (1, 3, 16, 20)
    # A constant has only a zero frequency, which fftshift moves to the centre.
    peak = spectrum[0, 0].flatten().argmax().item()
    assert divmod(peak, 20) == (8, 10)
    assert spectrum[0, 0, 8, 10].item() == pytest.approx(math.log1p(0.5 * math.sqrt(16 * 20)), rel=1e-5)
    assert spectrum.sum().item() == pytest.approx(3 * spectrum[0, 0, 8, 10].item(), rel=1e-5)


@pytest.mark.parametrize("size", [16, 32, 48])
def test_noise_and_frequency_branches_give_fixed_width_features(size: int) -> None:
    torch.manual_seed(0)
    noise = torch.randn(3, 3, size, size)
    assert NoiseBranch(width=8, feature_dim=5).eval()(noise).shape == (3, 5)
    assert FrequencyBranch(width=8, feature_dim=7, grid=4).eval()(noise).shape == (3, 7)


SUBSETS = [s for n in range(1, 4) for s in itertools.combinations(BRANCHES, n)]


@pytest.mark.parametrize("branches", SUBSETS, ids=lambda b: "+".join(b))
@pytest.mark.parametrize("size", [24, 32])
def test_every_branch_subset_builds_and_scores(branches: tuple[str, ...], size: int) -> None:
    model = _model(replace(TINY, branches=branches))
    crops, embeddings = torch.rand(3, 3, size, size), torch.randn(3, EMBED)
    assert model.features(crops, embeddings).shape == (3, TINY.feature_dim * len(branches))
    logits = model(crops, embeddings)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    assert (model.noise is not None) == ("noise" in branches)
    assert (model.frequency is not None) == ("frequency" in branches)
    assert (model.semantic is not None) == ("semantic" in branches)
    if "semantic" in branches:
        with pytest.raises(ValueError, match="needs CLIP embeddings"):
            model(crops)
        # The embedding is read: another one gives another logit.
        assert not torch.allclose(model(crops, -embeddings), logits)
    else:
        torch.testing.assert_close(model(crops), logits)  # embeddings ignored, not required


def test_config_round_trips_through_json_and_refuses_nonsense() -> None:
    config = NirnetConfig(branches=("frequency", "noise"), backbone="abc123", crops=9)
    assert NirnetConfig.from_json(config.to_json()) == config
    for bad in ({"branches": ()}, {"branches": ("noise", "rgb")}, {"branches": ("noise", "noise")},
                {"norm": "layer"}, {"crop_size": 0}):
        with pytest.raises(ValueError):
            NirnetConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown NIRNet config fields"):
        NirnetConfig.from_json('{"crop_size": 32, "attention": true}')


def test_group_norm_variant_scores_each_crop_alone() -> None:
    model = _model(replace(TINY, norm="group", extractor_width=12))
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    crops, embeddings = torch.rand(3, 3, 32, 32), torch.randn(3, EMBED)
    # No statistics across the batch: a crop's logit does not depend on the crops beside it.
    torch.testing.assert_close(model(crops, embeddings)[:1], model(crops[:1], embeddings[:1]))


def test_save_then_load_gives_the_same_model(tmp_path: Path) -> None:
    model = _model(seed=3)
    save_model(model, tmp_path / "w", {"recipe": "test"})
    assert {p.name for p in (tmp_path / "w").iterdir()} == {WEIGHTS_FILE, CONFIG_FILE}
    loaded = load_model(tmp_path / "w")
    assert loaded.config == model.config and not loaded.training
    crops, embeddings = torch.rand(2, 3, 32, 32), torch.randn(2, EMBED)
    torch.testing.assert_close(loaded(crops, embeddings), model(crops, embeddings))
    # A state that does not fit its config is refused, not half-loaded.
    (tmp_path / "w" / CONFIG_FILE).write_text(replace(TINY, extractor_depth=3).to_json())
    with pytest.raises(RuntimeError):
        load_model(tmp_path / "w")


# --- the plugin ------------------------------------------------------------------------------------------


def test_without_weights_the_plugin_registers_nothing(tmp_path: Path) -> None:
    settings = load_settings(plugins={"deny": OTHERS, "enable": ["builtin-nirnet"]},
                             detectors={"options": {"nirnet": {"weights_dir": str(tmp_path / "none")}}})
    pm = build_plugin_manager(settings.plugins)
    assert pm.has_plugin("builtin-nirnet")
    with capture_logs() as logs:
        names = {spec.name for spec in collect_detectors(pm, settings)}
    assert "nirnet" not in names
    (missing,) = [e for e in logs if e["event"] == "detector.weights_missing"]
    assert missing["detector"] == "nirnet" and missing["log_level"] == "warning"
    assert missing["weights_dir"] == str(tmp_path / "none")
    # Opt-in: a default process does not even load the plugin.
    assert not build_plugin_manager(load_settings().plugins).has_plugin("builtin-nirnet")


def test_the_shipped_weights_are_small_documented_and_score() -> None:
    directory = DETECTOR.default_weights
    files = {p.name for p in directory.iterdir()}
    assert {WEIGHTS_FILE, CONFIG_FILE, "calibration.json", "meta.json", "training.json", "MODEL_CARD.md"} <= files
    assert sum(p.stat().st_size for p in directory.iterdir()) < 5 * 1024 * 1024
    config = NirnetConfig.from_json((directory / CONFIG_FILE).read_text())
    assert config.backbone == load_backbone(BackboneSettings()).version  # its semantic branch's CLIP
    settings = load_settings(plugins={"deny": OTHERS, "enable": ["builtin-nirnet"]})
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        (spec,) = scorer.specs
        assert spec.name == "nirnet" and spec.calibration.method == "temperature"
        # The card describes these weights, not older ones, and says which residual source and losses made them.
        card = (directory / "MODEL_CARD.md").read_text()
        meta = json.loads((directory / "meta.json").read_text())
        assert spec.version in card and f"residual source `{meta['residual_source']}`" in card
        assert "Difference-Aware Loss: off" in card and not meta.get("difference_loss")
        rng = np.random.default_rng(0)
        jobs = [ImageJob(str(i), encode(Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)), fmt))
                for i, fmt in enumerate(("PNG", "JPEG"))]
        outcomes = scorer.score(jobs)
    for outcome in outcomes:
        (score,) = outcome.verdict.scores  # type: ignore[union-attr]
        assert score.error is None and score.probability is not None and 0.0 < score.probability < 1.0


def test_unreadable_config_registers_nothing(tmp_path: Path) -> None:
    save_model(_model(), tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"crop_size": 32, "attention": true}')
    settings = _settings(tmp_path, tmp_path / "no-clip")
    with capture_logs() as logs:
        names = {spec.name for spec in collect_detectors(build_plugin_manager(settings.plugins), settings)}
    assert "nirnet" not in names
    assert [e["detector"] for e in logs if e["event"] == "detector.config_unreadable"] == ["nirnet"]


def _spec(settings: Settings):  # type: ignore[no-untyped-def]
    (spec,) = [s for s in collect_detectors(build_plugin_manager(settings.plugins), settings) if s.name == "nirnet"]
    return spec


def test_spec_declares_native_raw_crops_and_a_version_of_the_weights(tmp_path: Path, clip_dir: Path) -> None:
    save_model(_model(seed=1), tmp_path / "a")
    spec = _spec(_settings(tmp_path / "a", clip_dir))
    assert spec.contract == InputContract(size=32, fit="crop", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crops=4)
    assert spec.version.startswith("nirnet-1+") and spec.weights_dir == tmp_path / "a"
    assert spec.triton_model == "nirnet" and spec.trunk is None  # the ensemble `triton build` writes
    # Same files, same version; other weights, or the same weights under another config, another version.
    save_model(_model(seed=1), tmp_path / "a2")
    assert _spec(_settings(tmp_path / "a2", clip_dir)).version == spec.version
    save_model(_model(seed=2), tmp_path / "a")
    retrained = _spec(_settings(tmp_path / "a", clip_dir)).version
    assert retrained != spec.version
    config = NirnetConfig.from_json((tmp_path / "a" / CONFIG_FILE).read_text())
    (tmp_path / "a" / CONFIG_FILE).write_text(replace(config, crops=2).to_json())
    assert _spec(_settings(tmp_path / "a", clip_dir)).version not in (spec.version, retrained)


def test_scores_a_decoded_image_as_the_mean_of_its_native_crops(tmp_path: Path, clip_dir: Path,
                                                                clip_version: str) -> None:
    """Through the plugin, the runner and the Scorer: the calibrated mean of the model's logits on raw crops
    of the decoded image, each with the CLIP embedding of the whole image."""
    model = _model(replace(TINY, backbone=clip_version), seed=4)
    save_model(model, tmp_path)
    Calibration(scale=0.5, bias=0.25, method="platt").save(tmp_path)
    image = _photo(150, 100, seed=1)
    (score,) = _score(_settings(tmp_path, clip_dir), image)

    native = np.asarray(image, np.float32) / 255
    crops = [native[top:top + 32, left:left + 32].transpose(2, 0, 1) for left, top in crop_boxes(150, 100, 32, 4)]
    assert len(crops) == 4
    encoder = load_backbone(BackboneSettings(checkpoint=clip_dir))
    with torch.no_grad():
        whole = prepare(DecodedImage(image, "PNG", 150, 100), InputContract(size=32, fit="resize"))
        embedding = encoder(torch.from_numpy(whole)[None]).expand(4, -1)
        expected = model(torch.from_numpy(np.stack(crops)), embedding).mean().item()
    assert score.raw_logit == pytest.approx(expected, abs=1e-4)
    assert score.logit == pytest.approx(0.5 * expected + 0.25, abs=1e-4)
    assert score.probability == pytest.approx(1 / (1 + math.exp(-(0.5 * expected + 0.25))), abs=1e-4)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """What reaches the model: every (crops, embeddings) batch its forward receives."""
    calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    original = NIRNet.forward

    def spy(self: NIRNet, pixels: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        calls.append((pixels.clone(), None if embeddings is None else embeddings.clone()))
        return original(self, pixels, embeddings)

    monkeypatch.setattr(NIRNet, "forward", spy)
    yield calls


def test_a_large_image_reaches_the_model_as_unresized_native_crops(
        tmp_path: Path, clip_dir: Path, seen: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    save_model(_model(seed=5), tmp_path)
    large, small = _photo(1200, 900, seed=2), _photo(20, 24, seed=3)
    _score(_settings(tmp_path, clip_dir), large, small)
    crops = torch.cat([pixels for pixels, _ in seen])
    embeddings = torch.cat([e for _, e in seen if e is not None])
    # Four crops of the large image, one (mirror-padded) of the small one, which is smaller than a crop.
    assert crops.shape == (5, 3, 32, 32) and embeddings.shape == (5, EMBED)
    native = np.asarray(large, np.float32) / 255
    for crop, (left, top) in zip(crops[:4], crop_boxes(1200, 900, 32, 4), strict=True):
        np.testing.assert_array_equal(crop.numpy(), native[top:top + 32, left:left + 32].transpose(2, 0, 1))
    small_native = np.asarray(small, np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(crops[4, :, 4:28, 6:26], small_native)  # mirror-padded all round
    # Crops of one image share its one embedding; the two images' differ.
    assert all(torch.equal(embeddings[i], embeddings[0]) for i in range(4))
    assert not torch.allclose(embeddings[4], embeddings[0])


def test_a_model_without_the_semantic_branch_needs_no_clip(tmp_path: Path) -> None:
    # One crop: the single-view contract (a centre crop, no aggregation) on the same backend.
    model = _model(replace(TINY, branches=("noise", "frequency"), crops=1), seed=6)
    save_model(model, tmp_path)
    image = _photo(90, 70)
    # A backbone checkpoint that does not exist: loading CLIP would fail the detector.
    (score,) = _score(_settings(tmp_path, tmp_path / "no-clip"), image)
    centre = np.asarray(image, np.float32)[19:51, 29:61].transpose(2, 0, 1) / 255
    with torch.no_grad():
        assert score.raw_logit == pytest.approx(model(torch.from_numpy(centre)[None]).item(), abs=1e-4)


def test_crops_go_through_in_slices_with_their_own_images_embeddings(tmp_path: Path, clip_dir: Path) -> None:

    model = _model(seed=7)
    encoder = load_backbone(BackboneSettings(checkpoint=clip_dir))
    images = [DecodedImage(_photo(64, 48, seed=i), "PNG", 64, 48) for i in range(3)]
    contract = InputContract(size=32, fit="crop", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crops=4)
    batch = [DetectorInput(view, image) for image in images for view in prepare_views(image, contract)]
    whole = NirnetBackend(model, encoder).predict(batch)
    sliced = NirnetBackend(model, encoder, crops_per_pass=5).predict(batch)
    assert len(whole) == 12 and sliced == pytest.approx(whole, abs=1e-5)
    # Each crop alone, with its own image: the same logit as among the others.
    alone = [NirnetBackend(model, encoder).predict([item])[0] for item in batch]
    assert alone == pytest.approx(whole, abs=1e-5)


@pytest.mark.parametrize(("change", "message"), [({"backbone": "0123456789ab"}, "was trained on backbone"),
                                                  ({"semantic_dim": EMBED + 1}, "expects 17-d CLIP embeddings")])
def test_a_semantic_branch_made_for_another_clip_is_a_clear_load_error(
        tmp_path: Path, clip_dir: Path, change: dict[str, Any], message: str) -> None:
    save_model(_model(replace(TINY, **change)), tmp_path)
    settings = _settings(tmp_path, clip_dir)
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        (runner,) = scorer.runners
        assert runner.load_error is not None and message in runner.load_error


def test_registering_needs_no_torch(tmp_path: Path) -> None:
    """A worker judging on Triton has no torch: the plugin must still read its version and contract."""
    save_model(_model(), tmp_path)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None\n"
            "from streamguard.config import load_settings\n"
            "from streamguard.builtin.nirnet.plugin import DETECTOR\n"
            f"settings = load_settings(detectors={{'options': {{'nirnet': {{'weights_dir': {str(tmp_path)!r}}}}}}})\n"
            "spec = DETECTOR.spec(settings)\n"
            "print(spec.version, spec.contract.crops)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == [_spec(_settings(tmp_path, tmp_path / "no-clip")).version, "4"]
