"""``streamguard train``: train a built-in detector's weights from labelled data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from streamguard.cli.context import AppContext

pass_app = click.make_pass_decorator(AppContext)


@click.group("train")
def train_group() -> None:
    """Train detector weights."""


@train_group.command("univfd")
@click.option("--data", "data", multiple=True, required=True, help="Dataset (any layout `eval` reads); repeatable.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Weights directory (default: the shipped one).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit-per-group", type=int, default=None, help="Seeded subsample per (label, generator/source).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-augment", is_flag=True, help="Embed images as they are (shortcut-prone; for ablations).")
@pass_app
def train_univfd_command(app: AppContext, data: tuple[str, ...], out: Path | None, seed: int,
                         limit_per_group: int | None, device: str, no_augment: bool) -> None:
    """Fit the UnivFD linear probe on frozen CLIP embeddings; writes head, calibration and a report."""
    from streamguard.builtin.univfd.plugin import WEIGHTS_DIR
    from streamguard.builtin.univfd.train import TrainConfig, train_univfd

    cfg = TrainConfig(data=data, out=out or WEIGHTS_DIR, seed=seed, limit_per_group=limit_per_group,
                      device=device, augment=not no_augment)
    report = train_univfd(app.settings, cfg)
    summary = {k: report[k] for k in ("version", "C", "counts")}
    for split in ("val", "test"):
        if split in report:
            summary[split] = report[split]["overall"]  # type: ignore[index]
    click.echo(json.dumps(summary, indent=2))
