"""What a built-in CLIP-head detector is, without torch: its files, version, input and `DetectorSpec`.

A weights directory holds ``head.safetensors`` (the linear head), for the detectors that tune the encoder
``lora.safetensors`` (the adapters only, with the architecture they were made for in its metadata), and
``calibration.json``, ``meta.json`` (backbone version, recipe) and ``training.json`` (the report).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from streamguard.backends.inprocess import inprocess_loader
from streamguard.config import PluginSettings, Settings
from streamguard.detectors.spec import (
    CLASS_TOKENS,
    CLIP_TRUNK,
    VIEW_SEPARATOR,
    BranchContext,
    BranchPoint,
    Calibration,
    DetectorSpec,
    LoadContext,
    TrunkSpec,
)
from streamguard.intake.contract import RESIZE, InputContract, view_tag, with_views

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

LORA_FILE = "lora.safetensors"
HEAD_FILE = "head.safetensors"
META_FILE = "meta.json"
TRAINING_FILE = "training.json"
# The served input; training prepares its images with the same contract.
CONTRACT = InputContract(size=224, fit="resize")
VERSION_PREFIX = 1  # bump when the served model's structure or preprocessing changes
# What a head's probe reads, in its safetensors metadata: a change of it is a change of the head file, so of
# the version's digest.
HEAD_READS_KEY = "streamguard.reads"
EMBEDDING = "embedding"


@dataclass(frozen=True)
class ClipHeadDetector:
    """One built-in CLIP-head detector. ``adapters``: it tunes the encoder's last blocks with LoRA (pin-clip,
    mpft) rather than reading the frozen encoder (univfd)."""

    name: str
    default_weights: Path
    adapters: bool
    description: str
    default_view: str = RESIZE  # the views it scores when ``detectors.options.<name>.views`` is unset

    @property
    def files(self) -> tuple[str, ...]:
        """The files its version is made of, in digest order."""
        return (LORA_FILE, HEAD_FILE) if self.adapters else (HEAD_FILE,)

    def weights_dir(self, settings: Settings) -> Path:
        """``detectors.options.<name>.weights_dir`` when set, else the shipped folder."""
        return Path(settings.detectors.options.get(self.name, {}).get("weights_dir", self.default_weights))

    def has_weights(self, directory: Path) -> bool:
        return all((directory / name).is_file() for name in self.files)

    def weights_digest(self, directory: Path) -> str:
        """Changes whenever the adapters or the head change: part of the version, hence of dedupe keys."""
        h = hashlib.sha256()
        for name in self.files:
            h.update((directory / name).read_bytes())
        return h.hexdigest()[:10]

    def version(self, directory: Path, computation: str = "fp32", view: str = RESIZE) -> str:
        """``<name>-<prefix>+<digest>``, and ``.<computation>`` (``.int8``, ``.ort-fp32``) for any other computation
        than torch at fp32 (whose versions stay as they always were), and ``@<view>`` for any other view than
        the resized one: the served model's version with what the client does differently named after it."""
        suffix = "" if computation == "fp32" else f".{computation}"
        if view != RESIZE:
            suffix += f"{VIEW_SEPARATOR}{view_tag(view)}"
        return f"{self.name}-{VERSION_PREFIX}+{self.weights_digest(directory)}{suffix}"

    def view(self, settings: Settings) -> str:
        """``detectors.options.<name>.views``, the views of an image it scores (``resize``, ``crops2``,
        ``crops2+whole``, ... as `with_views` names them); ``default_view`` when unset. Refuses an unknown name."""
        view = settings.detectors.options.get(self.name, {}).get("views", self.default_view)
        try:
            served_contract(view)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"detectors.options.{self.name}.views: {exc}") from None
        return str(view)

    def computation(self, settings: Settings) -> str:
        """What computes its encoder, as its version names it: in-process ``backbone.precision``, prefixed
        ``ort-`` when ONNX Runtime runs the trunk (``backbone.runtime``); on Triton, what the repository was
        built with, always fp32 (`streamguard triton build`), so the version matches the server's."""
        if settings.detectors.backend_for(self.name) != "inprocess":
            return "fp32"
        precision = settings.backbone.precision
        return f"ort-{precision}" if settings.backbone.runtime == "onnxruntime" else precision

    def retrain_hint(self) -> str:
        return f"retrain it with `streamguard train {self.name}` on this backbone"

    def missing_weights(self, directory: Path) -> str:
        return (f"no {self.name} weights in {directory} ({' and '.join(self.files)}); train them with "
                f"`streamguard train {self.name} --out {directory}`")

    def reads_class_tokens(self, directory: Path) -> bool:
        """Whether its head reads the class token of every block rather than the encoder's embedding."""
        return not self.adapters and head_reads(directory / HEAD_FILE) == CLASS_TOKENS

    def branch_block(self, directory: Path) -> BranchPoint | None:
        """Where it branches off the shared CLIP trunk: the first block its adapters tune, `CLASS_TOKENS` for a
        head on every block's class token, or None (after the last block) when it reads the frozen encoder."""
        if self.adapters:
            return min(adapter_blocks(directory / LORA_FILE))
        return CLASS_TOKENS if self.reads_class_tokens(directory) else None

    def trunk(self, settings: Settings, directory: Path) -> TrunkSpec | None:
        """Its `TrunkSpec`; None (it runs its whole model) when its adapters cannot be read here: loading them
        will then say what is wrong."""
        try:
            block = self.branch_block(directory)
        except (OSError, ValueError) as exc:
            log.warning("detector.no_shared_trunk", detector=self.name, error=f"{type(exc).__name__}: {exc}")
            return None

        def head(ctx: BranchContext) -> torch.nn.Module:
            from streamguard.builtin.cliphead.model import build_branch

            return build_branch(self, ctx.trunk, directory, block, ctx.precision)

        return TrunkSpec(backbone=CLIP_TRUNK, branch_block=block, load_head=head)

    def spec(self, settings: Settings) -> DetectorSpec | None:
        """Its `DetectorSpec`, or None (and one warning) while its weights directory holds no trained weights."""
        directory = self.weights_dir(settings)
        if not self.has_weights(directory):
            log.warning("detector.weights_missing", detector=self.name, weights_dir=str(directory),
                        hint=f"train them with `streamguard train {self.name} --out {directory}`, or set "
                             f"detectors.options.{self.name}.weights_dir")
            return None

        def build(ctx: LoadContext) -> torch.nn.Module:
            from streamguard.backbone import load_backbone
            from streamguard.backbone.precision import check_device
            from streamguard.builtin.cliphead.model import build_served

            precision = settings.backbone.precision
            check_device(precision, ctx.device)
            # fp32 first: adapters are merged into the float weights, then the merged encoder is quantized.
            return build_served(self, load_backbone(settings.backbone, ctx.device, precision="fp32"), directory,
                                precision)

        view = self.view(settings)
        return DetectorSpec(
            name=self.name,
            version=self.version(directory, self.computation(settings), view),
            load=inprocess_loader(build),
            contract=served_contract(view),
            calibration=Calibration.load(directory),
            weights_dir=directory,
            description=self.description,
            triton_model=self.name,  # `streamguard triton build` names the model after the detector
            trunk=self.trunk(settings, directory),
        )


def served_contract(view: str) -> InputContract:
    """`CONTRACT` under a view name (`with_views`). The heads are trained on resized views, so an image too small
    for a native crop is judged on its resized view, not on a mirror-padded tile of itself."""
    contract = with_views(CONTRACT, view)
    return replace(contract, small_image="resize") if contract.fit == "crop" else contract


def head_reads(path: Path) -> str:
    """What a head file's probe reads, from its safetensors metadata (`HEAD_READS_KEY`): `EMBEDDING`, the
    encoder's output embedding (heads written before the key existed), or `CLASS_TOKENS`."""
    reads = _safetensors_header(path).get("__metadata__", {}).get(HEAD_READS_KEY, EMBEDDING)
    if reads not in (EMBEDDING, CLASS_TOKENS):
        raise ValueError(f"{path}: a head reading {reads!r}; this streamguard knows {EMBEDDING!r} and "
                         f"{CLASS_TOKENS!r}")
    return str(reads)


def adapter_blocks(path: Path) -> list[int]:
    """The encoder blocks a LoRA file adapts, read off its safetensors header alone."""
    header = _safetensors_header(path)
    # vision_model.encoder.layers.<i>.self_attn.<target>.lora_<A|B>
    blocks = {int(name.split(".")[3]) for name in header if name != "__metadata__"
              if name.startswith("vision_model.encoder.layers.") and name.split(".")[3].isdigit()}
    if not blocks:
        raise ValueError(f"{path}: no LoRA adapters of CLIP encoder blocks")
    return sorted(blocks)


def _safetensors_header(path: Path) -> dict[str, Any]:
    # Read by hand: registering a detector needs no torch, nor the safetensors package (a worker judging on
    # Triton has neither).
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", prefix)
        if size > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        return dict(json.loads(handle.read(size)))


def builtin_detectors(plugins: PluginSettings | None = None) -> dict[str, ClipHeadDetector]:
    """The CLIP-head detectors of the default plugins, by name: what `triton build` serves and what
    `train` writes. Derived from the plugin list, so a new built-in is served by adding its plugin.
    ``plugins``: only those these settings load (opt-in ones only when enabled), as a worker would."""
    from streamguard.plugins import DEFAULT_PLUGINS, is_allowed

    found: dict[str, ClipHeadDetector] = {}
    for plugin, module in DEFAULT_PLUGINS.items():
        if plugins is not None and not is_allowed(plugin, plugins):
            continue
        detector = getattr(importlib.import_module(module), "DETECTOR", None)
        if isinstance(detector, ClipHeadDetector):
            found[detector.name] = detector
    return found
