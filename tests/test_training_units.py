"""The fine-tuning pieces on a tiny CLIP the tests make: LoRA, the split forward and the prefix cache,
MPFT's texture-aware masking, PiN-CLIP's noise generator and loss."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from streamguard.backbone import ClipImageEncoder, vit
from streamguard.backbone.lora import LoraConfig, LoraMismatch
from streamguard.evaluation.datasets import Sample
from streamguard.intake import CLIP_MEAN, CLIP_STD
from streamguard.training.data import split_samples
from streamguard.training.lora import LoraLinear, add_lora, load_lora_state, lora_state, merge_lora
from streamguard.training.model import TunedClip, keep_tokens, tuned_start
from streamguard.training.mpft import MpftConfig, MpftObjective, texture_scores, tokens_to_keep
from streamguard.training.pinclip import (
    FeatureNoise,
    NoiseGenerator,
    PinClipConfig,
    PinClipObjective,
    kl_standard_normal,
    load_class_embeddings,
)
from streamguard.training.prefix_cache import PrefixCache

# 224-px input like the served contract, 32-px patches: 49 patch tokens, cheap on a CPU.
TINY: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 16,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "patch_size": 32,
    "image_size": 224,
    "hidden_act": "quick_gelu",
}


def tiny_clip(seed: int = 0, **overrides: Any) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        # Default init makes every layer norm 1 and every bias 0; perturbed, a wrong block order shows.
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def tiny_encoder(seed: int = 0, **overrides: Any) -> ClipImageEncoder:
    return ClipImageEncoder(tiny_clip(seed, **overrides), weights_sha256=f"{seed:064d}", source="test")


def pixels(n: int = 2, seed: int = 0, size: int = 224) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise_adapters(model: CLIPVisionModelWithProjection) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)


# -- LoRA ------------------------------------------------------------------------------------------------


def test_lora_zero_init_is_exactly_the_base_model() -> None:
    encoder = tiny_encoder()
    x = pixels()
    with torch.no_grad():
        before = encoder(x)
        add_lora(encoder.model, range(4), LoraConfig(rank=4, targets=("q_proj", "k_proj", "v_proj", "out_proj")), 0)
        after = encoder(x)
    assert len([m for m in encoder.modules() if isinstance(m, LoraLinear)]) == 16
    assert torch.equal(before, after)


def test_lora_merge_equals_unmerged_forward() -> None:
    encoder = tiny_encoder()
    x = pixels()
    add_lora(encoder.model, [2, 3], LoraConfig(rank=8), seed=3)
    _randomise_adapters(encoder.model)
    with torch.no_grad():
        base = tiny_encoder()(x)
        unmerged = encoder(x)
        assert merge_lora(encoder.model) == 4
        merged = encoder(x)
    assert not any(isinstance(m, LoraLinear) for m in encoder.modules())
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapters do change the model...
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)  # ...and merging keeps the change


def test_lora_adapters_are_seeded_and_round_trip() -> None:
    a, b, c = tiny_encoder(), tiny_encoder(), tiny_encoder()
    for encoder, seed in ((a, 5), (b, 5), (c, 6)):
        add_lora(encoder.model, [3], LoraConfig(), seed)
    state_a, state_c = lora_state(a.model), lora_state(c.model)
    assert sorted(state_a) == [f"vision_model.encoder.layers.3.self_attn.{p}.lora_{x}"
                               for p in ("q_proj", "v_proj") for x in "AB"]
    assert all(torch.equal(state_a[k], v) for k, v in lora_state(b.model).items())
    assert not torch.equal(state_a["vision_model.encoder.layers.3.self_attn.q_proj.lora_A"],
                           state_c["vision_model.encoder.layers.3.self_attn.q_proj.lora_A"])
    _randomise_adapters(a.model)
    load_lora_state(c.model, lora_state(a.model))
    assert all(torch.equal(lora_state(a.model)[k], v) for k, v in lora_state(c.model).items())
    wide = tiny_encoder(hidden_size=48, intermediate_size=96)
    add_lora(wide.model, [3], LoraConfig(), 0)
    with pytest.raises(LoraMismatch, match="shape"):
        load_lora_state(wide.model, lora_state(a.model))
    with pytest.raises(LoraMismatch, match="missing"):
        load_lora_state(c.model, {})


# -- the split forward and the prefix cache ----------------------------------------------------------


def test_split_forward_equals_the_encoder() -> None:
    encoder = tiny_encoder()
    x = pixels()
    with torch.no_grad():
        hidden = vit.run_blocks(encoder, vit.tokens(encoder, x), 0, 2)
        split = vit.pool(encoder, vit.run_blocks(encoder, hidden, 2, 4))
        torch.testing.assert_close(split, encoder(x), atol=1e-6, rtol=1e-6)


def test_prefix_cache_gives_the_hidden_states_of_a_full_forward(tmp_path: Path) -> None:
    encoder = tiny_encoder()
    model = TunedClip(encoder, tuned_start(encoder, 2), LoraConfig(), seed=0)
    x = pixels(3)
    with torch.no_grad():
        reference = encoder.model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[2]
        prefix = model.prefix(x)
        torch.testing.assert_close(prefix, reference, atol=1e-6, rtol=1e-6)
        cache = PrefixCache(tmp_path, encoder.version, model.start, 224)
        texture = torch.arange(49, dtype=torch.float32)
        for i in range(3):
            cache.put(f"s{i}", "0:0", prefix[i], texture)
        stored = torch.stack([cache.get(f"s{i}", "0:0").hidden for i in range(3)])  # type: ignore[union-attr]
        assert stored.dtype == torch.float16
        torch.testing.assert_close(stored.float(), reference, atol=2e-3, rtol=1e-3)
        # The cached prefix through the tuned blocks is the full model's embedding (fp16 rounding aside).
        full = torch.nn.functional.normalize(encoder(x), dim=-1)
        torch.testing.assert_close(model.features(stored.float()), full, atol=1e-2, rtol=1e-2)
    assert torch.equal(cache.get("s0", "0:0").texture, texture)  # type: ignore[union-attr]
    assert cache.get("s0", "0:1") is None  # another augmentation is another entry
    assert PrefixCache(tmp_path, "otherbackbone", model.start, 224).get("s0", "0:0") is None
    assert PrefixCache(tmp_path, encoder.version, 1, 224).get("s0", "0:0") is None


def test_tune_blocks_must_fit_the_encoder() -> None:
    encoder = tiny_encoder()
    assert tuned_start(encoder, None) == 0 and tuned_start(encoder, 1) == 3
    with pytest.raises(ValueError, match="between 1 and the encoder's 4 blocks"):
        tuned_start(encoder, 5)


# -- MPFT: texture-aware masking ----------------------------------------------------------------------


def _normalised(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) in [0, 1] -> CLIP-normalised (1, 3, H, W)."""
    mean, std = np.asarray(CLIP_MEAN), np.asarray(CLIP_STD)
    return torch.from_numpy(((image - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))


def _texture_by_hand(patch: np.ndarray) -> float:
    """Every pair of neighbours inside the patch once: right, down, down-right, down-left."""
    size, total = patch.shape[0], 0.0
    for i in range(size):
        for j in range(size):
            for di, dj in ((0, 1), (1, 0), (1, 1), (1, -1)):
                k, m = i + di, j + dj
                if 0 <= k < size and 0 <= m < size:
                    total += float(np.abs(patch[k, m] - patch[i, j]).sum())
    return total


def test_texture_score_is_the_four_direction_difference_sum() -> None:
    image = np.random.default_rng(0).random((8, 8, 3))
    scores = texture_scores(_normalised(image), 4, CLIP_MEAN, CLIP_STD)[0].numpy()
    expected = [_texture_by_hand(image[r * 4 : r * 4 + 4, c * 4 : c * 4 + 4]) for r in range(2) for c in range(2)]
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_texture_ranks_a_noisy_patch_above_flat_ones() -> None:
    image = np.full((64, 64, 3), 0.5)
    image[16:32, 32:48] = np.random.default_rng(1).random((16, 16, 3))  # patch (row 1, col 2) of a 4x4 grid
    image[48:64, 0:16] = np.linspace(0, 1, 16)[None, :, None]  # a smooth ramp: some texture, little
    scores = texture_scores(_normalised(image), 16, CLIP_MEAN, CLIP_STD)[0]
    assert int(scores.argmax()) == 1 * 4 + 2
    assert scores[6] > 5 * scores[12] > 0
    assert float(scores[0]) == pytest.approx(0.0, abs=1e-3)


def test_masking_drops_exactly_the_top_rho_patches() -> None:
    scores = torch.tensor([[5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 8.0, 2.0, 6.0, 4.0]])
    keep = tokens_to_keep(scores, 0.3)
    assert keep.tolist() == [[0, 1, 3, 5, 7, 8, 9]]  # scores 9, 8, 7 (patches 2, 6, 4) dropped
    assert tokens_to_keep(scores, 0.0).tolist() == [list(range(10))]
    hidden = torch.arange(11.0).view(1, 11, 1).expand(1, 11, 2)  # token t holds t; patch i is token i + 1
    kept = keep_tokens(hidden, keep)
    assert kept[0, :, 0].tolist() == [0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 9.0, 10.0]  # class token + kept patches


def test_texture_mode_drops_textured_tokens_and_random_mode_does_not() -> None:
    texture = torch.zeros(4, 100)
    texture[:, ::2] = torch.rand(4, 50, generator=torch.Generator().manual_seed(0)) + 1.0  # even = textured
    share = {}
    for mode in ("texture", "random"):
        objective = MpftObjective(MpftConfig(mode=mode))  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(0)
        textured = possible = 0
        for _ in range(50):
            keep = objective.keep_tokens(texture, generator)
            assert keep is not None
            for row in keep.tolist():
                dropped = set(range(100)) - set(row)
                assert 30 <= len(dropped) <= 70  # rho in [0.3, 0.7]
                textured += sum(1 for i in dropped if i % 2 == 0)
                possible += min(len(dropped), 50)  # at most 50 tokens are textured
        share[mode] = textured / possible
    assert share["texture"] == 1.0  # textured tokens go first, always
    assert share["random"] < 0.8  # blind to texture: about half of the dropped tokens are textured
    assert MpftObjective(MpftConfig(mode="none")).keep_tokens(texture, torch.Generator()) is None


def test_rho_is_drawn_per_batch_from_the_seeded_generator() -> None:
    objective = MpftObjective(MpftConfig())
    first = [objective.rho(g) for g in [torch.Generator().manual_seed(1)] for _ in range(20)]
    again = [objective.rho(g) for g in [torch.Generator().manual_seed(1)] for _ in range(20)]
    assert first == again and len(set(first)) == 20 and all(0.3 <= r <= 0.7 for r in first)


# -- PiN-CLIP: positive-incentive noise ---------------------------------------------------------------


def test_noise_generator_shapes_and_positive_scale() -> None:
    net = NoiseGenerator(embed_dim=16, attn_dim=8, seed=0, noise_scale=0.02)
    z = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    mean, scale = net(z)
    assert mean.shape == scale.shape == (5, 16)
    assert bool((scale > 0).all())
    assert torch.equal(mean, torch.zeros_like(mean))  # the mean head starts at zero...
    torch.testing.assert_close(scale.mean(), torch.tensor(0.02), atol=5e-3, rtol=0)  # ...the scale at 0.02
    assert isinstance(net.classes, torch.nn.Parameter)
    again = NoiseGenerator(embed_dim=16, attn_dim=8, seed=0, noise_scale=0.02)
    assert torch.equal(net.classes, again.classes)  # initialised from the seed
    # Pre-activations far below zero still give a positive scale, and a finite KL term.
    with torch.no_grad():
        net.scale.bias.fill_(-500.0)
    mean, scale = net(z)
    assert bool((scale > 0).all()) and bool(torch.isfinite(kl_standard_normal(mean, scale)))


def test_kl_term_matches_a_hand_computation() -> None:
    mean = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    scale = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    # Row 0: dim 0: 0.5 * (1 + 0.25 - 1) - log 1 = 0.125; dim 1: 0.5 * (4 + 1 - 1) - log 2. Row 1: 0.
    expected = (0.125 + 2.0 - math.log(2.0) + 0.0) / 2
    assert float(kl_standard_normal(mean, scale)) == pytest.approx(expected, rel=1e-6)


def test_noise_is_applied_only_in_training_mode() -> None:
    z = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    for mode in ("learned", "gaussian"):
        noise = FeatureNoise(PinClipConfig(mode=mode), embed_dim=16, seed=0)  # type: ignore[arg-type]
        noisy, kl = noise.train()(z, torch.Generator().manual_seed(0))
        assert not torch.equal(noisy, z)
        assert (kl is not None) == (mode == "learned")
        clean, kl = noise.eval()(z, torch.Generator().manual_seed(0))
        assert clean is z and kl is None
    noisy, _ = FeatureNoise(PinClipConfig(mode="gaussian", noise_scale=0.5), 16, 0).train()(
        torch.zeros(2000, 16), torch.Generator().manual_seed(0))
    assert float(noisy.std()) == pytest.approx(0.5, rel=0.05)
    none = FeatureNoise(PinClipConfig(mode="none"), 16, 0).train()
    assert none(z, torch.Generator())[0] is z


def test_pinclip_loss_is_noisy_plus_clean_bce_plus_beta_kl() -> None:
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    head = torch.nn.Linear(16, 1)
    objective = PinClipObjective(PinClipConfig(beta=0.01), embed_dim=16, seed=0)
    objective.module.train()
    loss, parts = objective.loss(z, head, labels, torch.Generator().manual_seed(3))
    noisy, kl = objective.module(z, torch.Generator().manual_seed(3))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(head(z).squeeze(-1), labels.float()) + bce(head(noisy).squeeze(-1), labels.float()) + 0.01 * kl
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert set(parts) == {"bce_clean", "bce_noisy", "kl"}
    plain, parts = PinClipObjective(PinClipConfig(mode="none"), 16, 0).loss(z, head, labels, torch.Generator())
    assert float(plain.detach()) == pytest.approx(float(bce(head(z).squeeze(-1), labels.float()).detach()), rel=1e-6)
    assert set(parts) == {"bce_clean"}


def test_class_embeddings_load_from_a_file_and_stay_frozen(tmp_path: Path) -> None:
    text = torch.randn(2, 16)
    save_file({"class_embeddings": text}, str(tmp_path / "text.safetensors"))
    np.save(tmp_path / "wrong.npy", np.zeros((3, 16), np.float32))
    assert torch.equal(load_class_embeddings(tmp_path / "text.safetensors", 16), text)
    with pytest.raises(ValueError, match=r"shape \(2, 16\)"):
        load_class_embeddings(tmp_path / "wrong.npy", 16)
    noise = FeatureNoise(PinClipConfig(class_embeddings=tmp_path / "text.safetensors"), 16, 0)
    assert noise.generator is not None
    assert not isinstance(noise.generator.classes, torch.nn.Parameter)
    assert torch.equal(noise.generator.classes, text)
    assert "classes" not in dict(noise.named_parameters(recurse=True))


# -- data: hold-outs --------------------------------------------------------------------------------


def _sample(name: str, label: int, generator: str, source: str, split: str) -> Sample:
    return Sample(id=name, path=name, member=None, label=label, generator=generator, family="unknown",
                  source=source, split=split)


def test_held_out_groups_leave_train_and_val_for_test() -> None:
    samples = [
        _sample("r1", 0, "real", "photos", "train"), _sample("r2", 0, "real", "scans", "val"),
        _sample("f1", 1, "gan", "set", "train"), _sample("f2", 1, "gan", "set", "val"),
        _sample("f3", 1, "diffusion", "set", "train"), _sample("f4", 1, "diffusion", "set", "test"),
    ]
    splits = split_samples(samples, holdout_generators=["gan"], holdout_sources=["scans"])
    assert [s.id for s in splits.train] == ["r1", "f3"]
    assert splits.val == []
    assert {s.id for s in splits.held_out} == {"r2", "f1", "f2"}
    assert [s.id for s in splits.test] == ["r2", "f1", "f2", "f4"]
    with pytest.raises(ValueError, match=r"nothing to hold out for \['gna'\]"):
        split_samples(samples, holdout_generators=["gna"])


def test_augmentation_is_class_blind_seeded_and_covers_platform_post_processing() -> None:
    import io
    import random

    from PIL import Image

    from streamguard.training.data import augment

    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    outs = [augment(data, random.Random(f"a2:0:{i}:x")) for i in range(40)]
    assert outs[0] == augment(data, random.Random("a2:0:0:x"))  # seeded: the cache key names the pixels
    kinds = {Image.open(io.BytesIO(o)).format for o in outs}
    assert kinds == {"JPEG", "PNG"}  # screenshots re-saved lossless, not only JPEG
    sides = {min(Image.open(io.BytesIO(o)).size) for o in outs}
    assert min(sides) >= 160 and max(sides) <= 512 and len(sides) > 10


def test_native_jpeg_reencodes_half_before_the_rescale_and_keeps_every_other_draw(tmp_path: Path) -> None:
    import io
    import random

    from PIL import Image

    from streamguard.training.data import augment
    from streamguard.training.loso import LosoConfig, run_settings

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    plain = [augment(data, random.Random(f"a2:0:{i}:x")) for i in range(40)]
    native = [augment(data, random.Random(f"a2:0:{i}:x"), native_jpeg=True) for i in range(40)]
    changed = [i for i in range(40) if plain[i] != native[i]]
    assert 10 <= len(changed) <= 30  # about half
    for i in changed:  # the same rescale, format and quality draw: only the native re-encode differs
        before, after = Image.open(io.BytesIO(plain[i])), Image.open(io.BytesIO(native[i]))
        assert (before.size, before.format) == (after.size, after.format)
    # A fold trained with the re-encode is not taken for one trained without it, and only probes take it.
    base = {"data": ("d",), "loso_data": ("d",), "out": tmp_path}
    plain_cfg = LosoConfig(**base, methods=("univfd-blocks",))  # type: ignore[arg-type]
    cfg = LosoConfig(**base, methods=("univfd-blocks",), native_jpeg=True)  # type: ignore[arg-type]
    assert "native_jpeg" not in run_settings(plain_cfg, "univfd-blocks")
    assert run_settings(cfg, "univfd-blocks")["native_jpeg"] is True
    with pytest.raises(ValueError, match="native JPEG re-encode is for the probe methods"):
        LosoConfig(**base, methods=("pin-clip",), native_jpeg=True)  # type: ignore[arg-type]


def test_mirror_turns_half_the_images_round_and_keeps_every_other_draw(tmp_path: Path) -> None:
    import io
    import random

    from PIL import Image

    from streamguard.training.data import augment
    from streamguard.training.loso import LosoConfig, run_settings

    dark_left = np.zeros((300, 400, 3), np.uint8)
    dark_left[:, 200:] = 255
    buf = io.BytesIO()
    Image.fromarray(dark_left).save(buf, format="PNG")
    data = buf.getvalue()

    def read(out: bytes) -> tuple[tuple[int, int], str | None, bool]:
        img = Image.open(io.BytesIO(out))
        grey = np.asarray(img.convert("L"), np.float32)
        half = grey.shape[1] // 2
        return img.size, img.format, bool(grey[:, :half].mean() > grey[:, half:].mean())

    plain_bytes = [augment(data, random.Random(f"a2:0:{i}:x")) for i in range(40)]
    mirrored_bytes = [augment(data, random.Random(f"a2:0:{i}:x"), mirror=True) for i in range(40)]
    plain, mirrored = [read(o) for o in plain_bytes], [read(o) for o in mirrored_bytes]
    assert not any(turned for _, _, turned in plain)
    turned = [i for i in range(40) if mirrored[i][2]]
    assert 10 <= len(turned) <= 30  # about half
    # The same rescale and format draw whether turned or not: the mirror is the only difference, and an
    # image left unturned is byte for byte what it was without the flag.
    assert [m[:2] for m in mirrored] == [p[:2] for p in plain]
    assert all(mirrored_bytes[i] == plain_bytes[i] for i in range(40) if i not in turned)
    assert augment(data, random.Random("a2:0:1:x"), native_jpeg=True, mirror=True) == augment(
        data, random.Random("a2:0:1:x"), native_jpeg=True, mirror=True)  # seeded: the cache key names the pixels
    base = {"data": ("d",), "loso_data": ("d",), "out": tmp_path, "methods": ("univfd-blocks",)}
    assert "mirror" not in run_settings(LosoConfig(**base), "univfd-blocks")  # type: ignore[arg-type]
    assert run_settings(LosoConfig(**base, mirror=True), "univfd-blocks")["mirror"] is True  # type: ignore[arg-type]
    base["methods"] = ("pin-clip",)
    with pytest.raises(ValueError, match="mirror images are for the probe methods"):
        LosoConfig(**base, mirror=True)  # type: ignore[arg-type]


def _tiny_dinov2(monkeypatch: pytest.MonkeyPatch, **arch: int) -> Any:
    """A random small DINOv2 that `load_dinov2` returns, weights spread enough that blocks differ."""
    import streamguard.backbone.dinov2 as dinov2
    from streamguard.backbone.dinov2 import Dinov2Arch, Dinov2Encoder

    torch.manual_seed(0)
    tiny = Dinov2Encoder(Dinov2Arch(heads=1, patch=14, pos_grid=4, **arch)).eval()
    with torch.no_grad():
        for param in tiny.parameters():
            param.normal_(0.0, 0.2)
    monkeypatch.setattr(dinov2, "load_dinov2", lambda *a, **k: tiny)
    return tiny


def test_frozen_dinov2_probe_and_rigid_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DINOv2 candidates of `train loso`: a middle block's CLS and mean patch token, and RIGID's score
    (how far the embedding moves under small pixel noise): non-negative, reproducible, zero without noise."""
    from streamguard.config import Settings
    from streamguard.training import univfd

    tiny = _tiny_dinov2(monkeypatch, hidden=64, layers=8, mlp=128)
    x = torch.randn(3, 3, 56, 56)
    cfg = univfd.TrainConfig(data=("d",), out=Path("o"), backbone="dinov2")
    probe = univfd.frozen_encoder(Settings(), cfg)
    with torch.no_grad():
        features = probe.encode(x)
        block = torch.nn.functional.layer_norm(tiny.hidden_states(x)[univfd.DINOV2_BLOCK], (64,))
    assert features.shape == (3, 128) and probe.normalise
    torch.testing.assert_close(features[:, :64], block[:, 0])  # the middle block, not the output
    assert "b6" in probe.version
    rigid = univfd.frozen_encoder(Settings(), replace(cfg, backbone="rigid"))
    with torch.no_grad():
        scores = rigid.encode(x)
        again = rigid.encode(x)
    assert scores.shape == (3, 1) and not rigid.normalise and rigid.version != probe.version
    assert (scores > 0).all() and torch.equal(scores, again)
    monkeypatch.setattr(univfd, "RIGID_NOISE", 0.0)
    with torch.no_grad():
        # float32 puts a vector's cosine with itself a few ulp (1.2e-7 each) off 1, and the score is x100.
        assert torch.allclose(rigid.encode(x), torch.zeros(3, 1), atol=1e-4)


def test_frozen_dinov2_blocks_reads_every_block_cls_and_patch_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dinov2-blocks`: block k's slice is the CLS and mean patch token after block k (not the output's, not
    block 6's alone), each layer-normalised, the pair unit length, so the block-window choice and the served
    coefficients of univfd-blocks apply unchanged."""
    import streamguard.backbone.dinov2 as dinov2
    from streamguard.config import Settings
    from streamguard.training import univfd
    from streamguard.training.probe_choice import candidates

    tiny = _tiny_dinov2(monkeypatch, hidden=32, layers=6, mlp=64)
    cfg = univfd.TrainConfig(data=("d",), out=Path("o"), backbone="dinov2-blocks")
    frozen = univfd.frozen_encoder(Settings(), cfg)
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        features = frozen.encode(x).view(3, 6, 64)
        states = tiny.hidden_states(x)
    assert frozen.blocks == 6 and frozen.normalise and frozen.contract == dinov2.DINOV2_CONTRACT
    assert frozen.version.endswith("-blocks") and frozen.version != univfd.frozen_encoder(
        Settings(), replace(cfg, backbone="dinov2")).version  # its own embedding cache
    torch.testing.assert_close(features.norm(dim=2), torch.ones(3, 6))
    for block in range(6):
        tokens = states[block + 1]
        pair = torch.cat([torch.nn.functional.layer_norm(tokens[:, 0], (32,)),
                          torch.nn.functional.layer_norm(tokens[:, 1:].mean(dim=1), (32,))], dim=1)
        torch.testing.assert_close(features[:, block], torch.nn.functional.normalize(pair, dim=1))
    assert not torch.allclose(features[:, 0], features[:, -1])
    assert {c.blocks for c in candidates((1.0,), frozen.blocks)} >= {(0, 6), (0, 4), (3, 6)}  # windows to choose


def _frozen_clip_reading(monkeypatch: pytest.MonkeyPatch, backbone: str) -> tuple[Any, ClipImageEncoder, torch.Tensor,
                                                                              tuple[torch.Tensor, ...]]:
    """The frozen reading ``backbone`` of a tiny CLIP tower, its features of three random images and HF's
    own hidden states of them, to check the features against."""
    from streamguard.config import Settings
    from streamguard.training import univfd

    encoder = tiny_encoder().eval()
    monkeypatch.setattr(univfd, "load_backbone", lambda *a, **k: encoder)
    frozen = univfd.frozen_encoder(Settings(), univfd.TrainConfig(data=("d",), out=Path("o"), backbone=backbone))  # type: ignore[arg-type]
    x = torch.randn(3, 3, encoder.image_size, encoder.image_size)
    with torch.no_grad():
        features = frozen.encode(x)
        states = encoder.model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
    return frozen, encoder, features, states


def test_frozen_clip_blocks_reads_every_block_class_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """`univfd-blocks`: block k's slice is the class token after block k (HF's own hidden states, not the
    output alone), layer-normalised and unit length, so a probe weighs blocks by what they say, not by scale."""
    from streamguard.training import univfd

    frozen, encoder, features, states = _frozen_clip_reading(monkeypatch, "clip-blocks")
    layers, hidden = encoder.config.num_hidden_layers, encoder.hidden_size
    features = features.view(3, layers, hidden)
    assert layers > 1 and frozen.normalise and frozen.contract == univfd.CONTRACT
    assert frozen.version == f"{encoder.version}-blocks"  # its own embedding cache, never univfd's
    torch.testing.assert_close(features.norm(dim=2), torch.ones(3, layers))
    for block in range(layers):
        expected = torch.nn.functional.layer_norm(states[block + 1][:, 0], (hidden,))
        torch.testing.assert_close(features[:, block], torch.nn.functional.normalize(expected, dim=1))


def test_frozen_clip_tokens_reads_every_block_class_and_patch_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    """`univfd-tokens`: block k's slice is the class token and the mean patch token after block k (checked
    against HF's own hidden states), each layer-normalised, the pair unit length, in its own cache."""
    from streamguard.training import univfd

    frozen, encoder, features, states = _frozen_clip_reading(monkeypatch, "clip-tokens")
    layers, hidden = encoder.config.num_hidden_layers, encoder.hidden_size
    features = features.view(3, layers, 2 * hidden)
    assert frozen.blocks == layers > 1 and frozen.normalise and frozen.contract == univfd.CONTRACT
    assert frozen.version == f"{encoder.version}-tokens"
    torch.testing.assert_close(features.norm(dim=2), torch.ones(3, layers))
    for block in range(layers):
        tokens = states[block + 1]
        pair = torch.cat([torch.nn.functional.layer_norm(tokens[:, 0], (hidden,)),
                          torch.nn.functional.layer_norm(tokens[:, 1:].mean(dim=1), (hidden,))], dim=1)
        torch.testing.assert_close(features[:, block], torch.nn.functional.normalize(pair, dim=1))


def test_the_served_class_token_head_computes_what_training_fit_it_on(tmp_path: Path) -> None:
    """The probe `train univfd` fits on `block_classes` gives the same logit served (whole model and branch
    head on the trunk's class tokens); its head file says what it reads, and a mismatched one is refused."""
    from safetensors.torch import save_file

    from streamguard.backends.torch_trunk import ClipTrunk
    from streamguard.builtin.cliphead.detector import HEAD_READS_KEY, head_reads
    from streamguard.builtin.cliphead.model import (
        ClassTokenModel,
        HeadMismatch,
        LinearProbe,
        build_branch,
        build_served,
    )
    from streamguard.builtin.univfd.plugin import DETECTOR as UNIVFD
    from streamguard.detectors.spec import CLASS_TOKENS
    from streamguard.training.artifacts import save_probe
    from streamguard.training.univfd import block_classes

    encoder = tiny_encoder().eval()
    probe = LinearProbe(encoder.config.num_hidden_layers * encoder.hidden_size)
    torch.nn.init.normal_(probe.linear.weight, std=1.0, generator=torch.Generator().manual_seed(3))
    save_probe(probe, tmp_path / "blocks", {}, reads=CLASS_TOKENS)
    assert head_reads(tmp_path / "blocks" / "head.safetensors") == CLASS_TOKENS
    assert UNIVFD.branch_block(tmp_path / "blocks") == CLASS_TOKENS
    x = pixels(3, seed=2)
    with torch.no_grad():
        expected = probe(block_classes(encoder, x))
        served = build_served(UNIVFD, tiny_encoder().eval(), tmp_path / "blocks")
        branch = build_branch(UNIVFD, encoder, tmp_path / "blocks", CLASS_TOKENS)
        classes = ClipTrunk(encoder, "cpu").forward(x, [CLASS_TOKENS])[CLASS_TOKENS]
        assert isinstance(served, ClassTokenModel)
        torch.testing.assert_close(served(x), expected)
        torch.testing.assert_close(branch(classes), expected)
    # Written before the key existed: a head on the output embedding, as univfd's were.
    save_file(LinearProbe(encoder.embed_dim).state_dict(), str(tmp_path / "head.safetensors"))
    assert head_reads(tmp_path / "head.safetensors") == "embedding" and UNIVFD.branch_block(tmp_path) is None
    save_file(probe.state_dict(), str(tmp_path / "head.safetensors"), metadata={HEAD_READS_KEY: "patches"})
    with pytest.raises(ValueError, match="a head reading 'patches'"):
        head_reads(tmp_path / "head.safetensors")
    # A class-token head made for a CLIP of other depth or width.
    save_probe(LinearProbe(12 * encoder.hidden_size), tmp_path / "deeper", {}, reads=CLASS_TOKENS)
    with pytest.raises(HeadMismatch, match=f"expects {12 * encoder.hidden_size}-d"):
        build_served(UNIVFD, tiny_encoder().eval(), tmp_path / "deeper")
