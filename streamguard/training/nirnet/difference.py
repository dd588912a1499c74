"""NIRNet's Difference-Aware Loss (arXiv 2503.09314), available when an operator supplies a VAE.

The simulator gives content-matched pairs: a real crop and the same crop imprinted. What separates the two
is the imprint alone, so the extractor's noise maps of the pair should differ the way a generator's own
encoder sees them differ. The loss asks a learned stride-``f`` projection of the extractor's noise-map
difference to predict the frozen VAE encoder's latent difference; its gradient shapes the extractor toward
what a latent-diffusion autoencoder is sensitive to, on top of the classification loss.

No VAE weights ship or download here (licences, size, the offline rule), so without ``--difference-vae``
the loss is off and the model card says so. The projection is training-only: serving never loads it.
"""

from __future__ import annotations

import torch
from torch import nn

from streamguard.training.nirnet.residuals import VaeResidual


class DifferenceAwareLoss(nn.Module):
    """``loss(extractor, clean, imprinted)``: the projected noise-map difference against the latent
    difference, as a mean squared error relative to the latent difference's own energy (1.0 for a
    projection that predicts nothing), so ``--difference-weight`` means the same for any VAE's latent scale."""

    def __init__(self, vae: VaeResidual) -> None:
        super().__init__()
        self.vae = vae  # frozen and outside the module's parameters: the optimizer never sees it
        self.project = nn.Conv2d(3, vae.latent_channels, kernel_size=vae.factor, stride=vae.factor)

    def forward(self, extractor: nn.Module, clean: torch.Tensor, imprinted: torch.Tensor) -> torch.Tensor:
        if clean.shape != imprinted.shape or clean.ndim != 4:
            raise ValueError(f"expected two (N, 3, H, W) batches of pairs, got {tuple(clean.shape)} and "
                             f"{tuple(imprinted.shape)}")
        target = (self.vae.latent(imprinted) - self.vae.latent(clean)).to(clean.device)
        # One pass for both halves: in training mode batch norm then normalises a pair alike, so their
        # difference is the imprint's, not two batches' statistics.
        both = extractor(torch.cat([clean, imprinted]))
        predicted = self.project(self.vae.pad(both[len(clean):] - both[:len(clean)]))
        energy = target.pow(2).mean()
        if energy < 1e-12:
            # Pairs the encoder cannot tell apart carry nothing to learn from (8-bit rounding can undo a faint
            # imprint): no gradient, rather than a ratio blown up by a zero denominator.
            return predicted.sum() * 0.0
        return (predicted - target).pow(2).mean() / energy
