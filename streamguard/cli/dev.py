"""``streamguard dev up|down``: a broker and a Redis on loopback with free ports, for development."""

from __future__ import annotations

from pathlib import Path

import click

from streamguard.cli.context import AppContext
from streamguard.devstack import ServiceError, create_topics, load_state, save_state, start_kafka, start_redis, stop_all

pass_app = click.make_pass_decorator(AppContext)
_WORKDIR = Path(".cache/dev")


@click.group("dev")
def dev_group() -> None:
    """Local services for development."""


@dev_group.command("up")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=_WORKDIR, show_default=True)
@click.option("--partitions", type=int, default=4, show_default=True, help="Partitions of the input topic.")
@pass_app
def dev_up(app: AppContext, workdir: Path, partitions: int) -> None:
    """Start the services; print their settings as `export` lines (use: eval "$(streamguard dev up)")."""
    services = [s for s in load_state(workdir) if s.alive()]
    if {s.name for s in services} != {"kafka", "redis"}:
        for service in services:
            service.stop()
        try:
            kafka = start_kafka(workdir)
            redis = start_redis(workdir)
        except ServiceError as exc:
            raise click.ClickException(str(exc)) from None
        services = [kafka, redis]
        save_state(workdir, services)
    by_name = {s.name: s for s in services}
    w = app.settings.worker
    create_topics(by_name["kafka"].address,
                  {w.input_topic: partitions, w.output_topic: partitions, w.dead_letter_topic: 1})
    click.echo(f"export STREAMGUARD_KAFKA__BOOTSTRAP_SERVERS={by_name['kafka'].address}")
    click.echo(f"export STREAMGUARD_REDIS__URL=redis://{by_name['redis'].address}/0")


@dev_group.command("down")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=_WORKDIR, show_default=True)
def dev_down(workdir: Path) -> None:
    """Stop the services `dev up` started."""
    stopped = stop_all(workdir)
    click.echo(f"stopped {len(stopped)} services" if stopped else "nothing was running")
