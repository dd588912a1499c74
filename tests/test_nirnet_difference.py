"""NIRNet's Difference-Aware Loss through a tiny real diffusers VAE the tests make."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamguard.builtin.nirnet.model import ImprintExtractor
from streamguard.training.nirnet.difference import DifferenceAwareLoss
from streamguard.training.nirnet.residuals import VaeResidual
from test_nirnet_simulator import save_tiny_vae


@pytest.fixture(scope="module")
def vae(tmp_path_factory: pytest.TempPathFactory) -> VaeResidual:
    path = tmp_path_factory.mktemp("difference") / "tiny-vae"
    save_tiny_vae(path)
    return VaeResidual(path)


def _pairs(n: int = 6, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(n, 3, size, size, generator=g) * 0.5 + 0.25
    imprinted = (clean + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return clean, imprinted


def test_a_projection_that_predicts_nothing_scores_one_and_the_target_is_the_latent_difference(
        vae: VaeResidual) -> None:
    loss = DifferenceAwareLoss(vae)
    torch.nn.init.zeros_(loss.project.weight)
    torch.nn.init.zeros_(loss.project.bias)
    clean, imprinted = _pairs()
    assert loss(ImprintExtractor(depth=1, width=8), clean, imprinted).item() == pytest.approx(1.0)
    # The same pair twice: nothing to learn, and no division by a zero difference.
    same = loss(ImprintExtractor(depth=1, width=8), clean, clean)
    assert same.item() == 0.0
    target = vae.latent(imprinted) - vae.latent(clean)
    assert target.shape == (6, vae.latent_channels, 16 // vae.factor, 16 // vae.factor)
    assert target.abs().mean() > 0


def test_it_trains_the_extractor_and_never_the_vae(vae: VaeResidual) -> None:
    torch.manual_seed(0)
    extractor = ImprintExtractor(depth=2, width=8)
    loss = DifferenceAwareLoss(vae)
    assert not any(p is q for p in loss.parameters() for q in vae.model.parameters())
    frozen = {k: v.clone() for k, v in vae.model.state_dict().items()}
    optimizer = torch.optim.Adam([*extractor.parameters(), *loss.parameters()], lr=3e-3)
    clean, imprinted = _pairs()
    values = []
    for _ in range(60):
        value = loss(extractor, clean, imprinted)
        optimizer.zero_grad()
        value.backward()
        if not values:
            grads = [p.grad for p in extractor.parameters()]
            assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads if g is not None)
        optimizer.step()
        values.append(value.item())
    assert values[-1] < 0.5 * values[0], values[::10]
    assert all(torch.equal(v, frozen[k]) for k, v in vae.model.state_dict().items())


def test_crops_that_do_not_divide_by_the_vae_s_factor_are_padded_alike(vae: VaeResidual) -> None:
    clean, imprinted = _pairs(size=15)
    value = DifferenceAwareLoss(vae)(ImprintExtractor(depth=1, width=8), clean, imprinted)
    assert torch.isfinite(value) and value.item() > 0
    with pytest.raises(ValueError, match="pairs"):
        DifferenceAwareLoss(vae)(ImprintExtractor(depth=1, width=8), clean, imprinted[:2])
