"""The shared trunk on Triton: the CLIP trunk as its own model, each detector's head as a model, and an
ensemble wiring them, so one request per batch runs the frozen blocks once for every detector.

    PIXELS -> clip-trunk -> HIDDEN_<b> per branch block -> <detector>-head -> LOGITS_<detector>

Trunk and heads are written from the detectors' own template, with their tensors written in: Python-backend
models (``python-template.pbtxt``, with a ``role`` parameter) or, with ``--format onnx``, ONNX graphs exported
here and checked against torch in ONNX Runtime (``onnx-template.pbtxt``: TensorRT at fp16 on GPU). The
ensemble (``platform: "ensemble"``) is written here, with each detector's version in its own parameter
(`shared_trunk.version_parameter`), which the worker checks like any model's. Tensor shapes come from the
backbone the models will load, so it is loaded once here.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from streamguard.backbone.manifest import BackboneShape, describe_cache
from streamguard.builtin.cliphead import CONTRACT, ClipHeadDetector
from streamguard.config import BackboneSettings
from streamguard.detectors.spec import CLASS_TOKENS, BranchPoint
from streamguard.detectors.trunk import in_order
from streamguard.triton.pbtxt import (
    Device,
    add_parameter,
    set_kind,
    set_name,
    set_parameter,
    set_tensors,
    set_warmup_input,
    strip_accelerator,
    tensors,
)
from streamguard.triton.shared_trunk import (
    ENSEMBLE_MODEL,
    HEAD_INPUT,
    TRUNK_MODEL,
    ensemble_output,
    head_model,
    hidden_tensor,
    version_parameter,
)

PIXELS = ("PIXELS", (3, CONTRACT.size, CONTRACT.size))
LOGITS = ("LOGITS", (1,))


def build_shared_trunk(out: Path, detectors: Mapping[str, tuple[ClipHeadDetector, Path]], device: Device,
                       backbone: BackboneSettings, template: Path, model_file: Path | None) -> dict[str, str]:
    """Write the trunk, a head per detector and the ensemble into ``out``; returns detector -> version.
    ``model_file``: the Python backend's ``model.py``; None exports ONNX graphs (``template`` the ONNX one)."""
    if len({ensemble_output(name) for name in detectors}) != len(detectors):
        raise ValueError(f"detector names {sorted(detectors)} collide as tensor names")
    # The Python backend's configs only need the encoder's shape: read from the cache, without loading torch
    # (seconds of `dev up`). An ONNX export, or an operator's checkpoint, needs the encoder itself.
    encoder = None
    if model_file is not None and backbone.checkpoint is None:
        shape = describe_cache(backbone.cache_dir)
    else:
        from streamguard.backbone import load_backbone, vit

        encoder = load_backbone(backbone, "cpu", precision="fp32")
        shape = BackboneShape(version=encoder.version, num_layers=vit.num_layers(encoder),
                              patch_size=encoder.patch_size, hidden_size=encoder.hidden_size,
                              image_size=encoder.image_size)
    total = shape.num_layers
    # Tokens of the served pixels (the contract's size; the encoder interpolates its position embedding when
    # its own size differs, as a small test model's does).
    hidden = (1 + (CONTRACT.size // shape.patch_size) ** 2, shape.hidden_size)
    blocks: dict[str, BranchPoint] = {name: total if (b := served.branch_block(weights)) is None else b
                                    for name, (served, weights) in detectors.items()}
    shapes = {block: (total, shape.hidden_size) if block == CLASS_TOKENS else hidden for block in blocks.values()}
    # The template's own header describes a whole detector; each model here gets a line of its own instead.
    base = set_kind(re.sub(r"\A(#[^\n]*\n)+", "", template.read_text()), device)
    if model_file is not None:
        base = set_parameter(base, "backbone_cache_dir", str(backbone.cache_dir.expanduser().resolve()))
        checkpoint = backbone.checkpoint.expanduser().resolve() if backbone.checkpoint is not None else None
        base = set_parameter(base, "backbone_checkpoint", str(checkpoint) if checkpoint else "")
    elif device == "cpu":
        base = strip_accelerator(base)
    points = in_order(set(blocks.values()))

    trunk = set_name(base, TRUNK_MODEL)
    trunk = set_tensors(trunk, "output", [(hidden_tensor(b), shapes[b]) for b in points])
    trunk = set_parameter(trunk, "streamguard_version", f"{TRUNK_MODEL}+{shape.version}")
    if model_file is not None:
        trunk = add_parameter(add_parameter(trunk, "role", "trunk"), "blocks", json.dumps(points))
    target = _directory(out / TRUNK_MODEL)
    if model_file is None:
        from streamguard.backends.ort_trunk import export_trunk

        export_trunk(encoder, points, target / "1" / "model.onnx", [hidden_tensor(b) for b in points], PIXELS[0],
                     CONTRACT.size)
    _write(target, f"# The shared CLIP trunk (backbone {shape.version}), to every branch point.\n" + trunk,
           model_file)

    versions = {}
    for name, (served, weights) in detectors.items():
        versions[name] = served.version(weights)
        head = set_name(base, head_model(name))
        head = set_tensors(head, "input", [(HEAD_INPUT, shapes[blocks[name]])])
        head = set_tensors(head, "output", [LOGITS])
        head = set_warmup_input(head, HEAD_INPUT, shapes[blocks[name]])
        head = set_parameter(head, "streamguard_version", versions[name])
        if model_file is not None:
            head = set_parameter(head, "detector", name)
            head = set_parameter(head, "weights_dir", str(weights))
            head = add_parameter(add_parameter(head, "role", "head"), "branch_block", str(blocks[name]))
        target = _directory(out / head_model(name))
        if model_file is None:
            from streamguard.builtin.cliphead.model import build_branch
            from streamguard.triton.onnx_export import export_onnx

            export_onnx(build_branch(served, encoder, weights, blocks[name]), target / "1" / "model.onnx",
                        shapes[blocks[name]], input_name=HEAD_INPUT, output_name=LOGITS[0])
        start = "on every block's class token" if blocks[name] == CLASS_TOKENS else f"from block {blocks[name]}"
        _write(target, f"# {name}'s head on the shared trunk, {start}.\n" + head, model_file)
    (out / ENSEMBLE_MODEL / "1").mkdir(parents=True, exist_ok=True)
    (out / ENSEMBLE_MODEL / "config.pbtxt").write_text(_ensemble(blocks, versions, hidden))
    return versions


def _directory(target: Path) -> Path:
    """``target`` emptied, with its version directory."""
    if target.exists():
        shutil.rmtree(target)
    (target / "1").mkdir(parents=True)
    return target


def _write(target: Path, config: str, model_file: Path | None) -> None:
    if model_file is not None:
        shutil.copyfile(model_file, target / "1" / "model.py")
    (target / "config.pbtxt").write_text(config)


def _ensemble(blocks: Mapping[str, BranchPoint], versions: Mapping[str, str], hidden: tuple[int, int]) -> str:
    def maps(kind: str, pairs: list[tuple[str, str]]) -> str:
        return " ".join(f"{kind} {{ key: {json.dumps(k)} value: {json.dumps(v)} }}" for k, v in pairs)

    points = in_order(set(blocks.values()))
    steps = [f"    {{ model_name: {json.dumps(TRUNK_MODEL)} model_version: -1 {maps('input_map', [('PIXELS', 'PIXELS')])} "
             f"{maps('output_map', [(hidden_tensor(b), hidden_tensor(b).lower()) for b in points])} }}"]
    for name, block in blocks.items():
        steps.append(f"    {{ model_name: {json.dumps(head_model(name))} model_version: -1 "
                     f"{maps('input_map', [(HEAD_INPUT, hidden_tensor(block).lower())])} "
                     f"{maps('output_map', [('LOGITS', ensemble_output(name))])} }}")
    parameters = "\n".join(f"parameters {{ key: {json.dumps(version_parameter(name))} value {{ string_value: "
                           f"{json.dumps(version)} }} }}" for name, version in versions.items())
    return (
        "# The CLIP detectors on one shared trunk (`streamguard triton build --shared-trunk`): one request\n"
        f"# runs the trunk once and every head on it. Hidden states between them: {list(hidden)} per image.\n"
        f"name: {json.dumps(ENSEMBLE_MODEL)}\n"
        'platform: "ensemble"\n'
        "max_batch_size: 32\n"
        f"{tensors('input', [PIXELS])}\n"
        f"{tensors('output', [(ensemble_output(name), LOGITS[1]) for name in blocks])}\n"
        "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
        f"{parameters}\n"
    )
