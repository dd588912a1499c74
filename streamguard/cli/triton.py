"""``streamguard triton build``: a Triton model repository serving the built-in univfd detector."""

from __future__ import annotations

import json
from pathlib import Path

import click

from streamguard.cli.context import AppContext

pass_app = click.make_pass_decorator(AppContext)


@click.group("triton")
def triton_group() -> None:
    """Triton Inference Server model repositories."""


@triton_group.command("build")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Instance kind: KIND_CPU or KIND_GPU.")
@click.option("--weights-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="univfd head directory (default: the shipped one).")
@click.option("--format", "fmt", type=click.Choice(["python", "onnx"]), default="python", show_default=True,
              help="python: torch in the Python backend; onnx: ONNX export, TensorRT fp16 on GPU.")
@pass_app
def triton_build_command(app: AppContext, out: Path, device: str, weights_dir: Path | None, fmt: str) -> None:
    """Write OUT/univfd: config.pbtxt plus 1/model.py (python) or 1/model.onnx (onnx), with the detector version."""
    from streamguard.triton.build import build_repository

    try:
        result = build_repository(out, device=device, weights_dir=weights_dir,  # type: ignore[arg-type]
                                  backbone=app.settings.backbone, fmt=fmt)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"repository": str(result.repository), "model": result.model,
                           "version": result.version, "device": result.device, "format": result.format}))
