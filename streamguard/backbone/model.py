"""``ClipImageEncoder``: the CLIP image tower every built-in detector stands on."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from streamguard.backbone.manifest import short_id, square_side


class ClipImageEncoder(torch.nn.Module):
    """Wraps ``CLIPVisionModelWithProjection``; input is CLIP-normalized pixels (``intake.contract``'s
    ``CLIP_MEAN`` / ``CLIP_STD``), shape (N, 3, H, W).

    Other sizes than ``image_size`` work (the position embedding is interpolated), at the cost of features
    the model was not trained on. Parameters stay trainable: detectors fine-tune their own copy.
    """

    def __init__(self, model: CLIPVisionModelWithProjection, *, weights_sha256: str, source: str) -> None:
        super().__init__()
        self.model = model
        self.weights_sha256 = weights_sha256
        self.source = source
        # What its blocks run at (`streamguard.backbone.precision`). Not part of `version`, which names the
        # weights: adapters trained on these weights fit them at any precision.
        self.precision = "fp32"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings (N, embed_dim): projected, not L2-normalized (CLIP normalizes before cosine)."""
        out = self.model(pixel_values=self._check(pixels), interpolate_pos_encoding=self._resized(pixels))
        return out.image_embeds

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Last hidden state (N, 1 + patches, hidden_size): the class token first, before post-layernorm."""
        out = self.model.vision_model(pixel_values=self._check(pixels), interpolate_pos_encoding=self._resized(pixels))
        return out.last_hidden_state

    @property
    def config(self) -> CLIPVisionConfig:
        return self.model.config

    @property
    def embed_dim(self) -> int:
        return int(self.config.projection_dim)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def image_size(self) -> int:
        return square_side(self.config.image_size)

    @property
    def patch_size(self) -> int:
        return square_side(self.config.patch_size)

    @property
    def version(self) -> str:
        """Short id of the weights (first hex digits of their content checksum)."""
        return short_id(self.weights_sha256)

    def _check(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != self.config.num_channels:
            channels = self.config.num_channels
            raise ValueError(f"expected pixels of shape (N, {channels}, H, W), got {tuple(pixels.shape)}")
        return pixels.to(dtype=self.model.dtype)

    def _resized(self, pixels: torch.Tensor) -> bool:
        return tuple(pixels.shape[-2:]) != (self.image_size, self.image_size)

