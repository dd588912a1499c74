"""NIRNet on Triton: each part of the model as its own Python-backend model with its own dynamic batcher,
and the ensemble (``platform: "ensemble"``) wiring them, named like the detector (`nirnet_parts`).

Every part is written from one template (``nirnet-part.pbtxt``, ``nirnet-model.py``) with its name, tensors,
``role``, the absolute weights directory and the detector version; each loads its slice of the same
``nirnet.safetensors`` the in-process backend loads, so the two compute the same function. The ensemble
carries the detector version in ``streamguard_version``, which the worker checks like any model's.

With the semantic branch the ensemble also takes ``WHOLE``, each crop's whole image as CLIP reads it, and
runs CLIP itself (``nirnet_clip``, the backbone of the build's settings at fp32, once per distinct image of a
batch): the worker stays torch-free. The backbone is loaded here once to learn its input size and embedding
width, and a semantic branch trained on another CLIP is refused, as the in-process loader refuses it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from streamguard.builtin.nirnet.files import NirnetConfig, has_weights, read_config, version
from streamguard.builtin.nirnet.plugin import NAME
from streamguard.config import BackboneSettings
from streamguard.triton.nirnet_parts import (
    CLIP_MODEL,
    CROPS,
    EMBEDDING,
    ENSEMBLE_MODEL,
    EXTRACTOR_MODEL,
    F_FREQ,
    F_NOISE,
    F_SEM,
    FEATURE_ORDER,
    FREQUENCY_MODEL,
    HEAD_MODEL,
    LOGITS,
    NOISE,
    NOISE_MODEL,
    PIXELS,
    ROLES,
    SEMANTIC_MODEL,
    WHOLE,
)
from streamguard.triton.pbtxt import Device, set_kind, set_name, set_parameter, set_tensors, tensors

PART_TEMPLATE = "nirnet-part.pbtxt"
PART_MODEL = "nirnet-model.py"
# Crops per execution of each part, and per ensemble request: the extractor keeps full resolution through
# every layer (the in-process backend's CROPS_PER_PASS, for the same memory reason).
MAX_BATCH = 16

Tensor = tuple[str, tuple[int, ...]]
# model -> its inputs and outputs, and the ensemble step's maps: (part tensor, ensemble tensor).
Step = tuple[str, list[Tensor], list[Tensor], list[tuple[str, str]], list[tuple[str, str]]]


def detector_version(directory: Path) -> str:
    return version(NAME, directory)


def build_nirnet(out: Path, directory: Path, device: Device, backbone: BackboneSettings, templates: Path) -> str:
    """Write the parts and the ensemble of the NIRNet in ``directory`` into ``out``; returns its version."""
    template, model_file = templates / PART_TEMPLATE, templates / PART_MODEL
    for path in (template, model_file):
        if not path.is_file():
            raise FileNotFoundError(f"no Triton template at {path}")
    if not has_weights(directory):
        raise FileNotFoundError(f"no {NAME} weights in {directory}")
    config = read_config(directory)
    served = detector_version(directory)
    whole = _clip_input(config, backbone, directory) if config.semantic else None
    steps = _steps(config, whole)
    base = set_kind(re.sub(r"\A(#[^\n]*\n)+", "", template.read_text()), device)
    base = set_parameter(base, "weights_dir", str(directory))
    base = set_parameter(base, "streamguard_version", served)
    if whole is not None:
        base = set_parameter(base, "backbone_cache_dir", str(backbone.cache_dir.expanduser().resolve()))
        checkpoint = backbone.checkpoint.expanduser().resolve() if backbone.checkpoint is not None else None
        base = set_parameter(base, "backbone_checkpoint", str(checkpoint) if checkpoint else "")
    for model, inputs, outputs, _, _ in steps:
        part = set_name(base, model)
        part = set_tensors(part, "input", inputs)
        part = set_tensors(part, "output", outputs)
        part = set_parameter(part, "role", ROLES[model])
        _write(out / model, f"# {model}: the {ROLES[model]} part of the {NAME} ensemble ({served}).\n" + part,
               model_file)
    target = out / ENSEMBLE_MODEL
    if target.exists():
        shutil.rmtree(target)
    (target / "1").mkdir(parents=True)
    ensemble_inputs = [(PIXELS, (3, config.crop_size, config.crop_size))] + ([(WHOLE, whole)] if whole else [])
    (target / "config.pbtxt").write_text(_ensemble(steps, ensemble_inputs, served))
    return served


def _clip_input(config: NirnetConfig, backbone: BackboneSettings, directory: Path) -> tuple[int, int, int]:
    from streamguard.backbone import load_backbone

    encoder = load_backbone(backbone, "cpu", precision="fp32")
    hint = "retrain it on this backbone, or serve a model without the semantic branch"
    if encoder.embed_dim != config.semantic_dim:
        raise ValueError(f"the nirnet semantic branch in {directory} expects {config.semantic_dim}-d CLIP embeddings "
                         f"but the backbone gives {encoder.embed_dim}; {hint}")
    if config.backbone is not None and config.backbone != encoder.version:
        raise ValueError(f"the nirnet semantic branch in {directory} was trained on backbone {config.backbone}, "
                         f"this backbone is {encoder.version}; {hint}")
    return (3, encoder.image_size, encoder.image_size)


def _steps(config: NirnetConfig, whole: tuple[int, ...] | None) -> list[Step]:
    crop, feature = (3, config.crop_size, config.crop_size), (config.feature_dim,)
    steps: list[Step] = []
    if "noise" in config.branches or "frequency" in config.branches:
        steps.append((EXTRACTOR_MODEL, [(CROPS, crop)], [(NOISE, crop)], [(CROPS, PIXELS)], [(NOISE, "noise")]))
    if "noise" in config.branches:
        steps.append((NOISE_MODEL, [(NOISE, crop)], [(F_NOISE, feature)], [(NOISE, "noise")], [(F_NOISE, "f_noise")]))
    if "frequency" in config.branches:
        steps.append((FREQUENCY_MODEL, [(NOISE, crop)], [(F_FREQ, feature)], [(NOISE, "noise")], [(F_FREQ, "f_freq")]))
    if whole is not None:
        embedding = (config.semantic_dim,)
        steps.append((CLIP_MODEL, [(WHOLE, whole)], [(EMBEDDING, embedding)], [(WHOLE, WHOLE)],
                      [(EMBEDDING, "embedding")]))
        steps.append((SEMANTIC_MODEL, [(EMBEDDING, embedding)], [(F_SEM, feature)], [(EMBEDDING, "embedding")],
                      [(F_SEM, "f_sem")]))
    features = [tensor for branch, tensor in FEATURE_ORDER if branch in config.branches]
    steps.append((HEAD_MODEL, [(t, feature) for t in features], [(LOGITS, (1,))],
                  [(t, t.lower()) for t in features], [(LOGITS, LOGITS)]))
    return steps


def _write(target: Path, config: str, model_file: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    (target / "1").mkdir(parents=True)
    shutil.copyfile(model_file, target / "1" / "model.py")
    (target / "config.pbtxt").write_text(config)


def _ensemble(steps: Sequence[Step], inputs: list[Tensor], served: str) -> str:
    def maps(kind: str, pairs: list[tuple[str, str]]) -> str:
        return " ".join(f"{kind} {{ key: {json.dumps(k)} value: {json.dumps(v)} }}" for k, v in pairs)

    lines = [f"    {{ model_name: {json.dumps(model)} model_version: -1 {maps('input_map', ins)} "
             f"{maps('output_map', outs)} }}" for model, _, _, ins, outs in steps]
    return (
        f"# {NAME} as an ensemble of its parts (`streamguard triton build`): one row per crop, each part\n"
        "# batched by its own dynamic batcher across concurrent requests.\n"
        f"name: {json.dumps(ENSEMBLE_MODEL)}\n"
        'platform: "ensemble"\n'
        f"max_batch_size: {MAX_BATCH}\n"
        f"{tensors('input', inputs)}\n"
        f"{tensors('output', [(LOGITS, (1,))])}\n"
        "ensemble_scheduling {\n  step [\n" + ",\n".join(lines) + "\n  ]\n}\n"
        f"parameters {{ key: \"streamguard_version\" value {{ string_value: {json.dumps(served)} }} }}\n"
    )
