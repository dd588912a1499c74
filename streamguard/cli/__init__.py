"""The ``streamguard`` command. Commands are thin: parse, build the objects the worker uses, print."""

from __future__ import annotations

from pathlib import Path

import click

from streamguard import __version__
from streamguard.cli.backbone import backbone_group
from streamguard.cli.context import AppContext
from streamguard.cli.dev import dev_group
from streamguard.cli.evaluate import calibrate_command, eval_command
from streamguard.cli.info import config_group, plugins_command, schema_command
from streamguard.cli.scan import scan_command
from streamguard.cli.stream import produce_command, tail_command
from streamguard.cli.train import train_group
from streamguard.cli.triton import triton_group
from streamguard.cli.worker import worker_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="STREAMGUARD_CONFIG",
    help="TOML config file (also STREAMGUARD_CONFIG).",
)
@click.version_option(__version__, prog_name="streamguard")
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None) -> None:
    """Flag AI-generated images on ingest streams."""
    ctx.obj = AppContext(config_file)


cli.add_command(scan_command)
cli.add_command(schema_command)
cli.add_command(config_group)
cli.add_command(plugins_command)
cli.add_command(worker_command)
cli.add_command(produce_command)
cli.add_command(tail_command)
cli.add_command(dev_group)
cli.add_command(backbone_group)
cli.add_command(eval_command)
cli.add_command(calibrate_command)
cli.add_command(train_group)
cli.add_command(triton_group)


def main() -> None:
    cli(prog_name="streamguard")
