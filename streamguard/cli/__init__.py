"""The ``streamguard`` command. Commands are thin: parse, build the objects the worker uses, print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import structlog

from streamguard import __version__
from streamguard.cli.backbone import backbone_group
from streamguard.cli.banks import banks_group
from streamguard.cli.context import AppContext
from streamguard.cli.dev import dev_group
from streamguard.cli.evaluate import calibrate_command, eval_command
from streamguard.cli.info import config_group, plugins_command, schema_command
from streamguard.cli.rescore import rescore_command
from streamguard.cli.review import review_group
from streamguard.cli.scan import scan_command
from streamguard.cli.serve import serve_command
from streamguard.cli.stream import produce_command, tail_command
from streamguard.cli.train import train_group
from streamguard.cli.triton import triton_group
from streamguard.cli.worker import worker_command
from streamguard.extras import missing_extra

log = structlog.get_logger(__name__)

# Exit status when the broker cannot be reached: not a crash (1), and worth telling apart from one.
KAFKA_UNREACHABLE_EXIT = 2


class _Cli(click.Group):
    """Turns Kafka being unreachable into one error line and exit 2, for every command that talks to it
    (worker, produce, tail): otherwise it is a sixty-line traceback whose one useful fact is its last line.
    Likewise a command that needs an extra that is not installed (torch for `train`, scikit-learn for
    `eval`, ...): one line naming what to install."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            extra = missing_extra(exc, f"`streamguard {ctx.invoked_subcommand}`")
            if extra is not None:
                raise click.ClickException(str(extra)) from None
            if not _kafka_unreachable(exc):
                raise
            app = ctx.find_object(AppContext)
            log.error(
                "kafka.unreachable",
                command=ctx.invoked_subcommand,
                bootstrap_servers=app.settings.kafka.bootstrap_servers if app else None,
                reason=f"{type(exc).__name__}: {exc}",
            )
            ctx.exit(KAFKA_UNREACHABLE_EXIT)


# kafka-python 3 raises KafkaTimeoutError when bootstrap runs out of time; 2.x raised NoBrokersAvailable,
# which 3.0 no longer has. Names, looked up when needed, so either version is understood.
_UNREACHABLE_ERRORS = ("NoBrokersAvailable", "KafkaConnectionError", "KafkaTimeoutError")


def _kafka_unreachable(exc: BaseException) -> bool:
    # Imported here, on failure only: kafka-python costs every command's start, and most never touch it.
    from kafka import errors

    kinds = tuple(kind for name in _UNREACHABLE_ERRORS if (kind := getattr(errors, name, None)) is not None)
    return isinstance(exc, kinds)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
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
cli.add_command(serve_command)
cli.add_command(produce_command)
cli.add_command(tail_command)
cli.add_command(dev_group)
cli.add_command(backbone_group)
cli.add_command(eval_command)
cli.add_command(calibrate_command)
cli.add_command(train_group)
cli.add_command(triton_group)
cli.add_command(banks_group)
cli.add_command(rescore_command)
cli.add_command(review_group)


def main() -> None:
    cli(prog_name="streamguard")
