"""``streamguard triton build``: a Triton model repository serving the built-in detectors."""

from __future__ import annotations

import json
from pathlib import Path

import click

from streamguard.cli.context import AppContext
from streamguard.extras import require

pass_app = click.make_pass_decorator(AppContext)


@click.group("triton")
def triton_group() -> None:
    """Triton Inference Server model repositories."""


def _weights(values: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r} is not NAME=DIR", param_hint="--weights")
        out[name] = Path(path)
    return out


@triton_group.command("build")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Instance kind: KIND_CPU or KIND_GPU.")
@click.option("--format", "fmt", type=click.Choice(["python", "onnx"]), default="python", show_default=True,
              help="python: torch in the Python backend; onnx: ONNX export, TensorRT fp16 on GPU. "
                   "NIRNet is always an ensemble of Python-backend parts.")
@click.option("--model", "models", multiple=True,
              help="Detector to include, whole and with --shared-trunk in the ensemble (repeatable; default: every "
                   "built-in detector that has weights).")
@click.option("--weights", "weights", multiple=True, metavar="NAME=DIR",
              help="A detector's weights directory instead of the shipped one (repeatable).")
@click.option("--shared-trunk", is_flag=True,
              help="Also write the detectors on one shared CLIP trunk: the trunk, a head each and the ensemble "
                   "the worker calls with triton.trunk_model, in --format (onnx: TensorRT fp16 on GPU).")
@click.option("--trunk-only", is_flag=True,
              help="With --shared-trunk: write the CLIP detectors on the trunk only, without their whole models "
                   "(for workers that set triton.trunk_model, which never call those).")
@pass_app
def triton_build_command(app: AppContext, out: Path, device: str, fmt: str, models: tuple[str, ...],
                         weights: tuple[str, ...], shared_trunk: bool, trunk_only: bool) -> None:
    """Write OUT/<detector>: config.pbtxt plus 1/model.py (python) or 1/model.onnx (onnx), with its version;
    for nirnet, the ensemble OUT/nirnet and its parts OUT/nirnet_* (`--weights nirnet=DIR` for unshipped weights).
    The summary's "load" lists every model written, for tritonserver's --load-model (triton.server.models)."""
    if trunk_only and not shared_trunk:
        # Checked before the extra: a wrong command line should say so even where torch is missing.
        raise click.UsageError("--trunk-only needs --shared-trunk: without the trunk it leaves the CLIP detectors "
                               "nothing to be served by")
    require("`streamguard triton build`", "inprocess")
    from streamguard.triton.build import build_repository

    try:
        result = build_repository(out, device=device, weights=_weights(weights),  # type: ignore[arg-type]
                                  backbone=app.settings.backbone, fmt=fmt,  # type: ignore[arg-type]
                                  models=list(models) or None, shared_trunk=shared_trunk,
                                  whole_models=not trunk_only)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    summary = {"repository": str(result.repository), "device": result.device, "format": result.format,
               "models": result.models, "load": result.model_names()}
    if shared_trunk:
        from streamguard.triton.shared_trunk import ENSEMBLE_MODEL

        summary["shared_trunk"] = {"model": ENSEMBLE_MODEL, "detectors": result.shared_trunk}
    click.echo(json.dumps(summary))
