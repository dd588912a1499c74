"""``backbone.precision = "int8"`` and ``"int8-mixed"``: the encoder's blocks dynamically quantized on the CPU (at
int8-mixed, the MLP output layers left float), adapters merged before, the same modules quantized whole or on
the shared trunk, and versions (hence dedupe keys) that tell int8, int8-mixed and fp32 scores apart while fp32
versions stay what they were.

On the tiny CLIP and detector weights of tests/test_trunk.py. bench/bench_encoder.py measures speed and the
accuracy cost on the real backbone.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_units import pixels
from test_trunk import _jobs, _raw, tiny  # noqa: F401 - ``tiny`` is a fixture used below

from streamguard.backbone import PrecisionUnsupported, load_backbone
from streamguard.backbone import precision as precision_module
from streamguard.backbone.precision import BLOCK_LINEARS, apply_precision, keeps_float
from streamguard.builtin.cliphead.model import build_branch, build_served
from streamguard.builtin.mpft.plugin import DETECTOR as MPFT
from streamguard.builtin.pinclip.plugin import DETECTOR as PINCLIP
from streamguard.config import BackboneSettings, Settings, load_settings
from streamguard.intake.inset import INSET_VERSION
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import Scorer

CLIP_DETECTORS = ("univfd", "pin-clip", "mpft")
QUANTIZED = torch.ao.nn.quantized.dynamic.Linear
LOWER = ("int8", "int8-mixed")


def _settings(tiny: dict[str, Path], precision: str, shared: bool = True, **detectors: object) -> Settings:
    options = {name: {"weights_dir": str(tiny[name])} for name in CLIP_DETECTORS}
    return load_settings(backbone={"checkpoint": str(tiny["clip"]), "precision": precision},
                         plugins={"deny": ["provenance", "brightness"], "enable": ["builtin-pinclip", "builtin-mpft"]},
                         detectors={"options": options, "shared_trunk": shared, "timeout_s": None, **detectors})


def _scores(settings: Settings, n: int = 6) -> dict[str, list[float]]:
    with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
        assert all(r.load_error is None for r in scorer.runners), [r.load_error for r in scorer.runners]
        return _raw(scorer, _jobs(n))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_int8_quantizes_every_block_linear_and_stays_close_to_fp32(tiny: dict[str, Path]) -> None:
    reference = load_backbone(BackboneSettings(checkpoint=tiny["clip"]))
    int8 = load_backbone(BackboneSettings(checkpoint=tiny["clip"], precision="int8"))
    assert (reference.precision, int8.precision) == ("fp32", "int8")
    blocks = int8.model.vision_model.encoder.layers
    # q, k, v, out projections and the two MLP layers of each block; the projection to the embedding stays float.
    assert sum(isinstance(m, QUANTIZED) for m in blocks.modules()) == 6 * len(blocks)
    assert not any(isinstance(m, torch.nn.Linear) for m in blocks.modules())
    assert type(int8.model.visual_projection) is torch.nn.Linear
    # The version names the weights, so adapters trained on them still fit the int8 encoder.
    assert int8.version == reference.version
    x = pixels(8)
    with torch.inference_mode():
        a, b = reference(x), int8(x)
    # Rounding the weights to 8 bits changes the embedding a little, never its direction: on the tiny CLIP
    # (width 32) cosine is above 0.999; 0.99 leaves room for other torch kernels.
    assert float(_cosine(a, b).min()) > 0.99
    assert float((a - b).abs().max()) > 0  # it did run other arithmetic


@pytest.mark.parametrize("precision", LOWER)
def test_int8_is_refused_on_a_non_cpu_device_before_loading(tiny: dict[str, Path], precision: str) -> None:
    # A checkpoint that does not exist: the refusal must come before anything is read.
    settings = BackboneSettings(checkpoint=tiny["clip"] / "absent", precision=precision)
    with pytest.raises(PrecisionUnsupported, match="CPU only"):
        load_backbone(settings, "cuda")
    # A detector set up that way fails to load with the reason, shared trunk or not.
    for shared in (True, False):
        settings_ = _settings(tiny, precision, shared=shared, device="cuda")
        with Scorer(settings_, build_plugin_manager(settings_.plugins)) as scorer:
            errors = {r.spec.name: r.load_error for r in scorer.runners}
        assert set(errors) == set(CLIP_DETECTORS)
        assert all(str(e).startswith("PrecisionUnsupported:") and "CPU only" in str(e) for e in errors.values()), errors


def test_versions_change_at_int8_and_stay_as_they_were_at_fp32(tiny: dict[str, Path]) -> None:
    def versions(settings: Settings) -> dict[str, str]:
        return Scorer(settings, build_plugin_manager(settings.plugins)).model_versions  # not started: no loading

    fp32, int8 = versions(_settings(tiny, "fp32")), versions(_settings(tiny, "int8"))
    mixed = versions(_settings(tiny, "int8-mixed"))
    files = {"univfd": ["head.safetensors"], "pin-clip": ["lora.safetensors", "head.safetensors"],
             "mpft": ["lora.safetensors", "head.safetensors"]}
    view = f"@resize-inset{INSET_VERSION}"  # the views the built-in detectors cut by default, after the model
    for name in CLIP_DETECTORS:
        digest = hashlib.sha256(b"".join((tiny[name] / f).read_bytes() for f in files[name])).hexdigest()[:10]
        assert fp32[name] == f"{name}-1+{digest}{view}"  # the format every fp32 verdict and cache entry carries
        assert int8[name] == f"{name}-1+{digest}.int8{view}"
        # Other arithmetic than int8's: its own version, or dedupe would hand out int8 verdicts for it.
        assert mixed[name] == f"{name}-1+{digest}.int8-mixed{view}"
    # On Triton the models are built at fp32, whatever backbone.precision says: the version must match theirs.
    on_triton = versions(_settings(tiny, "int8", backend="triton"))
    assert on_triton == fp32
    assert versions(_settings(tiny, "int8-mixed", backend="triton")) == fp32


@pytest.mark.parametrize("precision", LOWER)
def test_shared_trunk_and_lora_branches_run_at_int8_as_their_whole_models(tiny: dict[str, Path],
                                                                          precision: str) -> None:
    shared, separate = _scores(_settings(tiny, precision)), _scores(_settings(tiny, precision, shared=False))
    reference = _scores(_settings(tiny, "fp32"))
    assert set(shared) == set(CLIP_DETECTORS)
    for name in CLIP_DETECTORS:
        # The same modules quantized the same way (adapters merged first in both): the same logits.
        np.testing.assert_allclose(shared[name], separate[name], rtol=0, atol=1e-5, err_msg=name)
        # And near fp32's: the tiny heads have random weights of norm ~4, so 0.1 is a few % of their spread.
        np.testing.assert_allclose(shared[name], reference[name], rtol=0, atol=0.1, err_msg=name)
    assert any(not np.array_equal(shared[n], reference[n]) for n in CLIP_DETECTORS)


def test_adapters_are_merged_before_quantizing(tiny: dict[str, Path]) -> None:
    int8 = load_backbone(BackboneSettings(checkpoint=tiny["clip"], precision="int8"))
    with pytest.raises(PrecisionUnsupported, match="fp32 encoder"):
        build_served(MPFT, int8, tiny["mpft"])
    with pytest.raises(PrecisionUnsupported, match="fp32 encoder"):
        build_branch(MPFT, int8, tiny["mpft"], 3)
    # From the float encoder: the head's merged copy is quantized, the encoder it copied from is left float.
    encoder = load_backbone(BackboneSettings(checkpoint=tiny["clip"]))
    head = build_branch(MPFT, encoder, tiny["mpft"], 3, "int8")
    assert sum(isinstance(m, QUANTIZED) for m in head.blocks.modules()) == 6
    assert not any(isinstance(m, QUANTIZED) for m in encoder.modules())


def _kinds(blocks: torch.nn.Module) -> dict[str, str]:
    return {name: "quantized" if isinstance(module, QUANTIZED) else "float" for name, module in blocks.named_modules()
            if isinstance(module, torch.nn.Linear | QUANTIZED)}


def test_int8_mixed_keeps_the_mlp_output_layers_float_and_quantizes_the_rest(tiny: dict[str, Path]) -> None:
    reference = load_backbone(BackboneSettings(checkpoint=tiny["clip"]))
    int8 = load_backbone(BackboneSettings(checkpoint=tiny["clip"], precision="int8"))
    mixed = load_backbone(BackboneSettings(checkpoint=tiny["clip"], precision="int8-mixed"))
    assert mixed.precision == "int8-mixed" and mixed.version == reference.version
    blocks = mixed.model.vision_model.encoder.layers
    # Written out, not derived from FLOAT_LAYERS: a change of the rule must show here (and change the version).
    expected = {f"{i}.{layer}": "float" if layer == "mlp.fc2" else "quantized"
                for i in range(len(blocks)) for layer in BLOCK_LINEARS}
    assert _kinds(blocks) == expected
    for i, block in enumerate(blocks):
        assert type(block.mlp.fc2) is torch.nn.Linear
        assert all(isinstance(getattr(block.self_attn, p), QUANTIZED) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
        assert isinstance(block.mlp.fc1, QUANTIZED)
        # The float layer is the encoder's own, untouched.
        assert torch.equal(block.mlp.fc2.weight, reference.model.vision_model.encoder.layers[i].mlp.fc2.weight)
    assert type(mixed.model.visual_projection) is torch.nn.Linear
    x = pixels(8)
    with torch.inference_mode():
        a, b, c = reference(x), int8(x), mixed(x)
    assert float(_cosine(a, c).min()) > 0.99
    assert float((a - c).abs().max()) > 0  # quantized arithmetic ran
    assert float((b - c).abs().max()) > 0  # and not int8's


def test_float_layers_are_chosen_by_block_index_on_branch_copies(monkeypatch: pytest.MonkeyPatch,
                                                                 tiny: dict[str, Path]) -> None:
    # A rule that depends on the block index: a branch's copies must be judged by their indices in the
    # encoder, as the whole model's and the trunk's blocks are, or the shared trunk would compute another model.
    monkeypatch.setitem(precision_module.FLOAT_LAYERS, "int8-mixed", lambda block, layer, total: block == 2 and layer == "mlp.fc1")
    encoder = load_backbone(BackboneSettings(checkpoint=tiny["clip"]))
    layers = encoder.model.vision_model.encoder.layers
    copies = {i: copy.deepcopy(layers[i]) for i in (2, 3)}
    apply_precision(copies, "int8-mixed")
    assert type(copies[2].mlp.fc1) is torch.nn.Linear and isinstance(copies[2].mlp.fc2, QUANTIZED)
    assert isinstance(copies[3].mlp.fc1, QUANTIZED)
    # A sequence counts from block 0.
    whole = copy.deepcopy(layers)
    apply_precision(whole, "int8-mixed")
    assert [type(b.mlp.fc1) is torch.nn.Linear for b in whole] == [False, False, True, False]
    assert keeps_float("int8-mixed", 2, "mlp.fc1", 4) and not keeps_float("int8-mixed", 0, "mlp.fc1", 4)
    # A detector's branch head: pin-clip branches at block 2, so its first copy is block 2.
    head = build_branch(PINCLIP, encoder, tiny["pin-clip"], 2, "int8-mixed")
    assert [type(b.mlp.fc1) is torch.nn.Linear for b in head.blocks] == [True, False]


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(PrecisionUnsupported, match="unknown backbone.precision"):
        apply_precision([], "int4")
