"""Where an imprint is measured: r = x - f(x) for a fixed denoiser, a trained autoencoder or a real VAE.

Every source takes and returns float tensors (N, 3, H, W), x in [0, 1], at the image's native pixels: a
resized image has lost the imprint before any of these see it. ``name`` goes into the fitted statistics
and from there into the model card, so it must say which source (and which weights) made them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from streamguard.training.nirnet.autoencoder import TinyAutoencoder


@runtime_checkable
class ResidualSource(Protocol):
    @property
    def name(self) -> str: ...

    def residual(self, x: torch.Tensor) -> torch.Tensor: ...


class VaeUnavailable(RuntimeError):
    """An operator asked for a real VAE's residuals, and its weights or the library to run them are missing."""


class DenoiserResidual:
    """r = x - median3x3(x).

    Why a median and not a Gaussian or Wiener filter: the median is edge-preserving, so object edges (the
    image's content) stay out of the residual while pixel-scale noise and texture, where generators leave
    their imprint, go into it; it reproduces any linear ramp exactly (r = 0 on smooth shading) and has no
    parameter to tune. A linear low-pass would put every edge of the scene into r and teach the simulator
    "imprint = edges", which is semantics again.
    """

    name = "denoiser-median3"

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        windows = padded.unfold(-2, 3, 1).unfold(-2, 3, 1)  # (N, C, H, W, 3, 3)
        return x - windows.reshape(*x.shape, 9).median(dim=-1).values


class AutoencoderResidual:
    """r = x - AE(x) through an autoencoder trained here (`autoencoder.train_autoencoder`)."""

    def __init__(self, model: TinyAutoencoder, label: str = "") -> None:
        self.model = model.eval()
        config = model.config
        suffix = f"-{label}" if label else ""
        self._name = f"autoencoder-x{config.factor}-w{config.width}-z{config.latent_channels}{suffix}"

    @property
    def name(self) -> str:
        return self._name

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.model.reconstruct(x)


WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class VaeResidual:
    """r = x - decode(encode(x)) through an operator-supplied diffusers ``AutoencoderKL``; nothing is downloaded.

    ``weights`` is a diffusers-format directory (``config.json`` + ``diffusion_pytorch_model.safetensors``)
    or such a ``.safetensors`` file with its ``config.json`` beside it. The latent is the posterior's mode:
    the reconstruction is deterministic, so the same images always give the same statistics.
    """

    def __init__(self, weights: str | Path, device: str = "cpu") -> None:
        path = Path(weights)
        if not path.exists():
            raise VaeUnavailable(f"VAE weights not found at {path}: pass a diffusers AutoencoderKL directory "
                                 "(config.json + diffusion_pytorch_model.safetensors) or a .safetensors file "
                                 "with config.json beside it")
        directory = path if path.is_dir() else path.parent
        present = [directory / n for n in WEIGHTS_NAMES if (directory / n).is_file()]
        file = path if path.is_file() else (present[0] if present else None)
        if file is None or not (directory / "config.json").is_file():
            raise VaeUnavailable(f"{path}: a diffusers AutoencoderKL needs config.json and one of {WEIGHTS_NAMES}")
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise VaeUnavailable("residuals through a real VAE need the `diffusers` package (pip install diffusers "
                                 "safetensors), which is not installed; the denoiser and autoencoder sources "
                                 "need nothing extra") from None
        config = json.loads((directory / "config.json").read_text())
        self.model = AutoencoderKL.from_config(config)
        self.model.load_state_dict(_load_state(file))
        self.model.to(device).eval()
        self.factor = 2 ** (len(self.model.config.block_out_channels) - 1)  # 8 for every latent-diffusion VAE
        self.device = torch.device(device)
        digest = _digest(file)
        self._name = f"vae-{directory.name if path.is_dir() else path.stem}-{digest}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-padded to the VAE's downsampling, so every native pixel reaches the latent."""
        pad_h, pad_w = -x.shape[-2] % self.factor, -x.shape[-1] % self.factor
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x

    @torch.no_grad()
    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's posterior mode of [0, 1] pixels: (N, latent_channels, ceil(H / f), ceil(W / f))."""
        scaled = self.pad(x).to(self.device) * 2.0 - 1.0
        latent: torch.Tensor = self.model.encode(scaled).latent_dist.mode()
        return latent

    @torch.no_grad()
    def residual(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = (self.model.decode(self.latent(x)).sample.clamp(-1.0, 1.0) + 1.0) / 2.0
        return x - out[..., :h, :w].to(x.device, x.dtype)


def _load_state(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state: dict[str, torch.Tensor] = torch.load(file, map_location="cpu", weights_only=True)
    return state


def _digest(file: Path) -> str:
    # The card names the exact weights: two VAEs of one family (SD 1.x vs the fine-tuned ft-MSE) differ.
    sha = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:12]
