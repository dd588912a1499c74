"""The model under training: frozen blocks, LoRA'd tuned blocks, the projection, a linear head.

Blocks ``[0, start)`` are the frozen prefix (their output can be cached); blocks ``[start, L)`` carry
LoRA adapters. The head reads the L2-normalised image embedding, as the served model does
(`streamguard.builtin.cliphead`).
"""

from __future__ import annotations

import torch

from streamguard.backbone import ClipImageEncoder, vit
from streamguard.backbone.lora import LoraConfig
from streamguard.builtin.cliphead.model import LinearProbe
from streamguard.training.lora import add_lora, load_lora_state, lora_modules, lora_state

_HEAD_INIT_STD = 0.01


def tuned_start(encoder: ClipImageEncoder, tune_blocks: int | None) -> int:
    """Index of the first tuned block: the last ``tune_blocks`` of the encoder, or all of them (None)."""
    total = vit.num_layers(encoder)
    if tune_blocks is None:
        return 0
    if not 1 <= tune_blocks <= total:
        raise ValueError(f"--tune-blocks must be between 1 and the encoder's {total} blocks (or 'all'), "
                         f"not {tune_blocks}")
    return total - tune_blocks


def keep_tokens(hidden: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The class token plus the patch tokens indexed by ``keep`` (N, K), 0-based among patches.

    Position embeddings were added when the tokens were made, so a kept token still knows where it is.
    """
    if keep is None:
        return hidden
    index = (keep + 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.cat([hidden[:, :1], torch.gather(hidden, 1, index)], dim=1)


class TunedClip(torch.nn.Module):
    def __init__(self, encoder: ClipImageEncoder, start: int, lora: LoraConfig, seed: int) -> None:
        super().__init__()
        encoder.requires_grad_(False)
        add_lora(encoder.model, range(start, vit.num_layers(encoder)), lora, seed)
        self.encoder = encoder
        self.start = start
        self.lora = lora
        self.probe = LinearProbe(encoder.embed_dim).to(encoder.model.device)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            weight = torch.randn(self.probe.linear.weight.shape, generator=generator) * _HEAD_INIT_STD
            self.probe.linear.weight.copy_(weight)
            self.probe.linear.bias.zero_()

    @property
    def head(self) -> torch.nn.Linear:
        return self.probe.linear

    @torch.no_grad()
    def prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """Hidden states entering the first tuned block (no gradient: nothing before it is trained)."""
        return vit.run_blocks(self.encoder, vit.tokens(self.encoder, pixels), 0, self.start)

    def features(self, hidden: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised image embeddings from the prefix output, with only the ``keep`` patch tokens."""
        hidden = keep_tokens(hidden, keep)
        out = vit.run_blocks(self.encoder, hidden, self.start, vit.num_layers(self.encoder))
        return torch.nn.functional.normalize(vit.pool(self.encoder, out), dim=-1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).squeeze(-1)

    def trainable(self) -> list[torch.nn.Parameter]:
        adapters = [p for m in lora_modules(self.encoder.model).values() for p in (m.lora_A, m.lora_B)]
        return [*adapters, *self.probe.parameters()]

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """What is trained, on the CPU: the adapters and the head (the served detector's files)."""
        head = {k: v.detach().cpu().clone() for k, v in self.probe.state_dict().items()}
        return {"lora": {k: v.clone() for k, v in lora_state(self.encoder.model).items()}, "head": head}

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        load_lora_state(self.encoder.model, weights["lora"])
        self.probe.load_state_dict(weights["head"], strict=True)
