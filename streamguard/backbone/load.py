"""``load_backbone``: the CLIP image encoder from the operator's checkpoint or from the cache.

Nothing is downloaded here: the cache is made at set-up by ``streamguard backbone fetch``.
"""

from __future__ import annotations

import time

import structlog

from streamguard.backbone.arch import build_model
from streamguard.backbone.cache import cache_path, corrupt_error, load_cache
from streamguard.backbone.checkpoints import read_checkpoint
from streamguard.backbone.digest import weights_digest
from streamguard.backbone.errors import CheckpointError
from streamguard.backbone.model import ClipImageEncoder
from streamguard.backbone.precision import Precision, check_device, quantize_encoder
from streamguard.config import BackboneSettings

log = structlog.get_logger(__name__)


def load_backbone(settings: BackboneSettings, device: str = "cpu", *,
                  precision: Precision | None = None) -> ClipImageEncoder:
    """``settings.checkpoint`` if set, else the verified cache, in eval mode on ``device``, its blocks at
    ``precision`` (default ``settings.precision``). Who trains, exports, or merges adapters before serving
    asks for ``"fp32"`` and quantizes after merging (`streamguard.backbone.precision`).

    Raises ``BackboneMissing`` (cache absent) / ``BackboneCorrupt`` (cache fails its checksum), both naming
    the fetch command, ``CheckpointError`` for an unusable operator checkpoint, or ``PrecisionUnsupported``
    for int8 on another device than the CPU (before loading anything).
    """
    precision = precision or settings.precision
    check_device(precision, device)
    start = time.perf_counter()
    if settings.checkpoint is not None:
        checkpoint = read_checkpoint(settings.checkpoint)
        digest = weights_digest(checkpoint.state)
        try:
            model = build_model(checkpoint.config, checkpoint.state)
        except RuntimeError as exc:
            raise CheckpointError(f"{settings.checkpoint}: does not load as a CLIP image tower: {exc}") from exc
        source = f"{checkpoint.kind}:{settings.checkpoint}"
    else:
        config, state, manifest = load_cache(settings.cache_dir)
        digest = manifest.weights_sha256
        try:
            model = build_model(config, state)
        except RuntimeError as exc:
            raise corrupt_error(cache_path(settings.cache_dir), f"weights do not fit its config: {exc}") from exc
        source = f"cache:{cache_path(settings.cache_dir)}"
    encoder = ClipImageEncoder(model, weights_sha256=digest, source=source).to(device).eval()
    quantize_encoder(encoder, precision)
    log.info("backbone.loaded", source=source, version=encoder.version, precision=precision,
             image_size=encoder.image_size, patch_size=encoder.patch_size, embed_dim=encoder.embed_dim,
             seconds=round(time.perf_counter() - start, 2))
    return encoder
