"""The on-disk cache of converted weights: ``<cache_dir>/clip-vit-b16/`` holding ``model.safetensors``,
``config.json`` and ``manifest.json``.

The directory is also a plain transformers directory (``CLIPVisionModelWithProjection.from_pretrained``
reads it). It is written into a staging directory and swapped in with renames, so a reader sees the old
cache or the new one, never a mix; the manifest ties the weights file to its checksum, and a mismatch reads
as corrupt.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import structlog
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig

from streamguard.backbone.arch import config_from_dict
from streamguard.backbone.cache_files import fsync, swap_in, write_text
from streamguard.backbone.digest import file_sha256
from streamguard.backbone.errors import FETCH_COMMAND, BackboneCorrupt, BackboneMissing
from streamguard.backbone.manifest import (  # noqa: F401 - the layout's torch-free home, re-exported
    CACHE_NAME,
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    cache_path,
)

log = structlog.get_logger(__name__)



def write_cache(
    cache_dir: Path, config: CLIPVisionConfig, state: Mapping[str, torch.Tensor], fields: Mapping[str, object]
) -> Manifest:
    """Write weights, config and manifest (``fields`` + the file checksum) and swap them in atomically."""
    target = cache_path(cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.staging-", dir=target.parent))
    try:
        weights = staging / WEIGHTS_FILE
        # "format: pt" is what transformers' from_pretrained expects in safetensors metadata.
        save_file({n: t.contiguous() for n, t in state.items()}, str(weights), metadata={"format": "pt"})
        fsync(weights)
        config_dict = config.to_dict()
        config_dict["architectures"] = ["CLIPVisionModelWithProjection"]
        write_text(staging / CONFIG_FILE, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        manifest = Manifest.model_validate({**fields, "safetensors_sha256": file_sha256(weights)})
        # Written last: a staging directory without a manifest is never mistaken for a cache.
        write_text(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2) + "\n")
        # mkdtemp makes the directory private and safetensors may write its file 0600: the cache is shared.
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("backbone.cache_written", path=str(target), weights_sha256=manifest.weights_sha256)
    return manifest


def read_manifest(cache_dir: Path) -> Manifest:
    """The manifest of a complete cache whose weights file matches it; ``BackboneMissing`` otherwise."""
    target = cache_path(cache_dir)
    manifest_file = target / MANIFEST_FILE
    if not target.is_dir() or not manifest_file.is_file():
        raise BackboneMissing(
            f"no CLIP backbone weights in {target}: run `{FETCH_COMMAND}` (or set backbone.checkpoint)"
        )
    try:
        manifest = Manifest.model_validate_json(manifest_file.read_bytes())
    except (ValidationError, OSError) as exc:
        raise corrupt_error(target, f"unreadable manifest: {exc.__class__.__name__}") from exc
    weights = target / WEIGHTS_FILE
    if not weights.is_file() or not (target / CONFIG_FILE).is_file():
        raise corrupt_error(target, f"{WEIGHTS_FILE} or {CONFIG_FILE} is missing")
    actual = file_sha256(weights)
    if actual != manifest.safetensors_sha256:
        raise corrupt_error(target, f"{WEIGHTS_FILE} has sha256 {actual[:12]}..., manifest says "
                       f"{manifest.safetensors_sha256[:12]}...")
    return manifest


def load_cache(cache_dir: Path) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor], Manifest]:
    """Config, tensors and manifest of a verified cache. Raises ``BackboneMissing`` / ``BackboneCorrupt``."""
    manifest = read_manifest(cache_dir)
    target = cache_path(cache_dir)
    try:
        config = config_from_dict(json.loads((target / CONFIG_FILE).read_text()))
        state = load_file(str(target / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise corrupt_error(target, f"{exc.__class__.__name__}: {exc}") from exc
    if len(state) != manifest.tensors:
        raise corrupt_error(target, f"{len(state)} tensors, manifest says {manifest.tensors}")
    return config, state, manifest


def corrupt_error(target: Path, reason: str) -> BackboneCorrupt:
    """The error for a cache that exists but cannot be trusted; it names the command that rebuilds it."""
    return BackboneCorrupt(f"CLIP backbone cache {target} is corrupt ({reason}): run `{FETCH_COMMAND} --force`")
