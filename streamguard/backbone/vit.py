"""CLIP's vision tower run in parts: tokens, any range of encoder blocks, the pooled image embedding.

``pool(run_blocks(tokens(x), 0, L))`` is exactly ``ClipImageEncoder(x)``; splitting it lets the runtime
compute the frozen blocks once for every detector that branches off them (`streamguard.backends.trunk`)
and lets training cache their output and drop tokens between two blocks.
"""

from __future__ import annotations

import torch

from streamguard.backbone.model import ClipImageEncoder


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
    return run_layers(encoder.model.vision_model.encoder.layers[start:stop], hidden)


def run_layers(layers: torch.nn.ModuleList | list[torch.nn.Module], hidden: torch.Tensor) -> torch.Tensor:
    """Encoder blocks in order, wherever they live (the encoder's own, or a detector's tuned copies)."""
    for layer in layers:
        hidden = layer(hidden, None)
    return hidden


def run_layers_with_classes(layers: torch.nn.ModuleList | list[torch.nn.Module],
                            hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`run_layers`, also keeping the class token after each block: (last hidden state, (N, blocks, hidden))."""
    classes = [hidden[:, :0]]  # none when there are no blocks
    for layer in layers:
        hidden = layer(hidden, None)
        classes.append(hidden[:, :1])
    return hidden, torch.cat(classes, dim=1)


def class_tokens(encoder: ClipImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """(N, blocks, hidden): the class token after each of ``encoder``'s blocks, for heads that read them all."""
    return run_layers_with_classes(encoder.model.vision_model.encoder.layers, tokens(encoder, pixels))[1]


def pool(encoder: ClipImageEncoder, hidden: torch.Tensor) -> torch.Tensor:
    """The image embedding (N, embed_dim) from the last hidden state: class token, post-layernorm, projection."""
    vision = encoder.model.vision_model
    return encoder.model.visual_projection(vision.post_layernorm(hidden[:, 0]))
