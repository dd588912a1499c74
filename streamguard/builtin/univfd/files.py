"""UnivFD's weight files and the version they make, without torch: the plugin registers from these alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

HEAD_FILE = "head.safetensors"
META_FILE = "meta.json"


def weights_digest(weights_dir: Path) -> str:
    """Changes whenever the head changes: part of the detector version, hence of dedupe keys."""
    path = weights_dir / HEAD_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "untrained"


def detector_version(weights_dir: Path) -> str:
    return f"univfd-1+{weights_digest(weights_dir)}"
