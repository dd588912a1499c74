"""The UnivFD model: frozen CLIP encoder -> L2-normalised embedding -> linear head -> one logit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Re-exported: the file names and the version live where the plugin can read them without torch.
from streamguard.builtin.univfd.files import HEAD_FILE, META_FILE, detector_version, weights_digest

__all__ = ["HEAD_FILE", "META_FILE", "LinearProbe", "UnivFD", "build_univfd", "detector_version", "load_probe",
           "save_probe", "weights_digest"]


class LinearProbe(torch.nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(embed_dim, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        # Normalising first makes the probe see direction only, as CLIP's own similarity does.
        return self.linear(torch.nn.functional.normalize(embeddings, dim=-1)).squeeze(-1)


class UnivFD(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, probe: LinearProbe) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.probe = probe

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.probe(self.encoder(pixels))


def save_probe(probe: LinearProbe, weights_dir: Path, meta: dict[str, object]) -> None:
    weights_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in probe.state_dict().items()}, str(weights_dir / HEAD_FILE))
    (weights_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_probe(weights_dir: Path) -> tuple[LinearProbe, dict[str, object]]:
    path = weights_dir / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no univfd head at {path}; train one with `streamguard train univfd --data DIR`")
    state = load_file(str(path))
    probe = LinearProbe(int(state["linear.weight"].shape[1]))
    probe.load_state_dict(state, strict=True)
    meta_path = weights_dir / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return probe.eval(), meta


def build_univfd(encoder: torch.nn.Module, weights_dir: Path) -> UnivFD:
    """The served model from a loaded encoder and a head directory; refuses a head of another width."""
    probe, _ = load_probe(weights_dir)
    embed_dim = int(encoder.embed_dim)  # type: ignore[arg-type]
    if probe.linear.in_features != embed_dim:
        raise ValueError(
            f"the univfd head in {weights_dir} expects {probe.linear.in_features}-d embeddings but the backbone "
            f"gives {embed_dim}; retrain it with `streamguard train univfd` on this backbone"
        )
    return UnivFD(encoder, probe)
