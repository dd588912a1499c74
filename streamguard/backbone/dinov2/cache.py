"""The converted DINOv2 weights on disk: ``<cache_dir>/dinov2-s14/`` holding ``model.safetensors`` and
``manifest.json`` (where they came from). Written into a staging directory and swapped in by rename, so a
reader sees the old cache or the new one, never a mix. Trust comes from the content checksum pinned in
``fetch.py`` and checked on every load, not from the manifest.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import structlog
import torch
from safetensors.torch import save_file

from streamguard.backbone.cache_files import fsync, swap_in
from streamguard.backbone.manifest import WheelManifest

log = structlog.get_logger(__name__)

CACHE_NAME = "dinov2-s14"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


class Dinov2Manifest(WheelManifest):
    model: str = "dinov2-vit-s14"


def cache_path(cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser() / CACHE_NAME


def write_cache(cache_dir: Path, state: Mapping[str, torch.Tensor], manifest: Dinov2Manifest) -> Path:
    target = cache_path(cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.staging-", dir=target.parent))
    try:
        save_file({n: t.contiguous() for n, t in state.items()}, str(staging / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        # mkdtemp makes the directory private and safetensors may write 0600: the cache is shared.
        for path in staging.iterdir():
            path.chmod(0o644)
            fsync(path)
        staging.chmod(0o755)
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("dinov2.cache_written", path=str(target), weights_sha256=manifest.weights_sha256)
    return target


def read_manifest(cache_dir: Path) -> Dinov2Manifest | None:
    """The manifest if one is there and readable; None otherwise (the caller rebuilds)."""
    try:
        return Dinov2Manifest.model_validate_json((cache_path(cache_dir) / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError):
        return None
