"""The files a fine-tuned CLIP detector ships as, and the served module they load into.

A weights directory holds ``lora.safetensors`` (the adapters only, with the architecture they were made
for in its metadata), ``head.safetensors`` (the linear head, UnivFD's format), ``calibration.json``,
``meta.json`` (backbone version, recipe) and ``training.json`` (the report). Loading applies the adapters
to the backbone that `load_backbone` returns, merges them into its weights and puts the head on top: the
served model is encoder -> projection -> L2-normalise -> linear -> one logit, the cost of a linear probe.
Adapters made for another backbone are refused with the command that makes fitting ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streamguard.backbone import ClipImageEncoder
# Re-exported: the files, the version and the spec live where the plugins can read them without torch.
from streamguard.builtin.finetuned import (
    CONTRACT,
    HEAD_FILE,
    LORA_FILE,
    META_FILE,
    TRAINING_FILE,
    VERSION_PREFIX,
    detector_spec,
    detector_version,
    has_weights,
    weights_digest,
    weights_dir,
)
from streamguard.builtin.univfd.model import LinearProbe
from streamguard.training.lora import (
    FORMAT,
    LoraConfig,
    LoraMismatch,
    adapter_layout,
    add_lora,
    load_lora_state,
    merge_lora,
)

__all__ = [
    "CONTRACT", "HEAD_FILE", "LAYOUT_KEY", "LORA_FILE", "META_FILE", "TRAINING_FILE", "VERSION_PREFIX", "FineTunedClip",
    "detector_spec", "detector_version", "has_weights", "load_detector", "save_detector", "weights_digest",
    "weights_dir",
]

LAYOUT_KEY = "streamguard_lora"


def save_detector(out: Path, weights: dict[str, dict[str, torch.Tensor]], lora: LoraConfig,
                  encoder: ClipImageEncoder, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    layout = {
        "format": FORMAT,
        "backbone": encoder.version,
        "hidden_size": encoder.hidden_size,
        "num_hidden_layers": int(encoder.config.num_hidden_layers),
        "rank": lora.rank,
        "alpha": float(lora.alpha),
        "targets": list(lora.targets),
    }
    # One metadata entry holding sorted JSON: safetensors writes several entries in hash order, and the
    # same weights must give the same bytes (the file's digest is part of the detector version).
    metadata = {LAYOUT_KEY: json.dumps(layout, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in weights["lora"].items()}, str(out / LORA_FILE), metadata=metadata)
    save_file({k: v.contiguous() for k, v in weights["head"].items()}, str(out / HEAD_FILE))
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    for name in (LORA_FILE, HEAD_FILE):
        (out / name).chmod(0o644)  # safetensors may write 0600; shipped weights are read by any user


class FineTunedClip(torch.nn.Module):
    """The served detector: CLIP encoder (adapters merged) -> L2-normalised embedding -> linear -> logit."""

    def __init__(self, encoder: ClipImageEncoder, probe: LinearProbe) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.probe = probe.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.probe(self.encoder(pixels))


def _retrain_hint(name: str) -> str:
    return f"retrain it with `streamguard train {name}` on this backbone"


def load_detector(encoder: ClipImageEncoder, directory: Path, name: str) -> FineTunedClip:
    """Apply and merge the adapters of ``directory`` onto ``encoder`` (in place) and add the head."""
    lora_path, head_path = directory / LORA_FILE, directory / HEAD_FILE
    if not has_weights(directory):
        raise FileNotFoundError(f"no {name} weights in {directory} ({LORA_FILE} and {HEAD_FILE}); "
                                f"train them with `streamguard train {name} --out {directory}`")
    with safe_open(str(lora_path), framework="pt") as handle:
        layout: dict[str, Any] = json.loads((handle.metadata() or {}).get(LAYOUT_KEY, "{}"))
    state = load_file(str(lora_path))
    layers, targets, rank, width = adapter_layout(state)
    total = int(encoder.config.num_hidden_layers)
    made_for = (f"{layout.get('num_hidden_layers', '?')} blocks of width {layout.get('hidden_size', width)} "
                f"(backbone {layout.get('backbone', '?')})")
    this = f"{total} blocks of width {encoder.hidden_size} (backbone {encoder.version})"
    if width != encoder.hidden_size or max(layers) >= total or layout.get("num_hidden_layers") != total:
        raise LoraMismatch(f"the {name} adapters in {directory} were made for a CLIP with {made_for}, but the "
                           f"backbone has {this}: {_retrain_hint(name)}")
    if layout.get("backbone") != encoder.version:
        # Adapters are deltas on particular weights: on other weights of the same shape they mean nothing.
        raise LoraMismatch(f"the {name} adapters in {directory} were trained on backbone {layout.get('backbone')}, "
                           f"this backbone is {encoder.version}: {_retrain_hint(name)}")
    head = load_file(str(head_path))
    probe = LinearProbe(int(head["linear.weight"].shape[1]))
    if probe.linear.in_features != encoder.embed_dim:
        raise LoraMismatch(f"the {name} head in {directory} expects {probe.linear.in_features}-d embeddings but "
                           f"the backbone gives {encoder.embed_dim}: {_retrain_hint(name)}")
    probe.load_state_dict(head, strict=True)
    cfg = LoraConfig(rank=rank, alpha=float(layout.get("alpha", 2 * rank)), targets=tuple(targets))
    device = encoder.model.device
    add_lora(encoder.model, layers, cfg, seed=0)
    load_lora_state(encoder.model, state)
    merge_lora(encoder.model)
    return FineTunedClip(encoder, probe.to(device))
