"""CLIP's vision tower run in parts: tokens, any range of encoder blocks, the pooled image embedding.

``pool(run_blocks(tokens(x), 0, L))`` is exactly ``ClipImageEncoder(x)``; splitting it lets training
cache the output of the frozen blocks and drop tokens between two blocks.
"""

from __future__ import annotations

import torch

from streamguard.backbone import ClipImageEncoder


def num_layers(encoder: ClipImageEncoder) -> int:
    return int(encoder.config.num_hidden_layers)


def tokens(encoder: ClipImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 1 + patches, hidden): class token then patches, position embeddings added, pre-layernorm applied."""
    vision = encoder.model.vision_model
    resized = tuple(pixels.shape[-2:]) != (encoder.image_size, encoder.image_size)
    embedded = vision.embeddings(pixels.to(encoder.model.dtype), interpolate_pos_encoding=resized)
    return vision.pre_layrnorm(embedded)


def run_blocks(encoder: ClipImageEncoder, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Blocks ``start``..``stop - 1``. Any subset of tokens may come in: CLIP has no attention mask here."""
    for layer in encoder.model.vision_model.encoder.layers[start:stop]:
        hidden = layer(hidden, None)
    return hidden


def pool(encoder: ClipImageEncoder, hidden: torch.Tensor) -> torch.Tensor:
    """The image embedding (N, embed_dim) from the last hidden state: class token, post-layernorm, projection."""
    vision = encoder.model.vision_model
    return encoder.model.visual_projection(vision.post_layernorm(hidden[:, 0]))


def keep_tokens(hidden: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The class token plus the patch tokens indexed by ``keep`` (N, K), 0-based among patches.

    Position embeddings were added when the tokens were made, so a kept token still knows where it is.
    """
    if keep is None:
        return hidden
    index = (keep + 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.cat([hidden[:, :1], torch.gather(hidden, 1, index)], dim=1)
