"""Writing a trained detector's files, in the format its serving module reads (`streamguard.builtin.cliphead`).

``save_probe`` writes a head (univfd), ``save_detector`` the adapters and head of a fine-tuned detector
(pin-clip, mpft), with the adapters' layout in the safetensors metadata (`streamguard.backbone.lora`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from streamguard.backbone import ClipImageEncoder
from streamguard.backbone.lora import FORMAT, LAYOUT_KEY, LoraConfig
from streamguard.builtin.cliphead import HEAD_FILE, HEAD_READS_KEY, LORA_FILE, META_FILE
from streamguard.builtin.cliphead.detector import EMBEDDING
from streamguard.builtin.cliphead.model import LinearProbe


def _shareable(*paths: Path) -> None:
    for path in paths:
        path.chmod(0o644)  # safetensors may write 0600; shipped weights are read by any user


def save_probe(probe: LinearProbe, out: Path, meta: dict[str, object], reads: str = EMBEDDING) -> None:
    """``reads``: what the probe takes, `EMBEDDING` or `CLASS_TOKENS`, kept in the head file where serving
    reads it (`streamguard.builtin.cliphead.detector.head_reads`)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in probe.state_dict().items()}, str(out / HEAD_FILE),
              metadata={HEAD_READS_KEY: reads})
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _shareable(out / HEAD_FILE)


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
    _shareable(out / LORA_FILE, out / HEAD_FILE)
