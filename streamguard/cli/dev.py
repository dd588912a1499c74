"""``streamguard dev up|down``: a broker, a Redis and a Triton server on loopback with free ports, for development.

Triton serves a repository built by `streamguard triton build` into the work directory, with explicit model
control; the worker uses it when ``STREAMGUARD_DETECTORS__BACKEND=triton``.
"""

from __future__ import annotations

from pathlib import Path

import click

from streamguard.cli.context import AppContext
from streamguard.devstack import (
    Service,
    ServiceError,
    TritonService,
    create_topics,
    load_state,
    save_state,
    start_kafka,
    start_redis,
    start_triton,
    stop_all,
)

pass_app = click.make_pass_decorator(AppContext)
_WORKDIR = Path(".cache/dev")


@click.group("dev")
def dev_group() -> None:
    """Local services for development."""


@dev_group.command("up")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=_WORKDIR, show_default=True)
@click.option("--partitions", type=int, default=4, show_default=True, help="Partitions of the input topic.")
@click.option("--triton/--no-triton", default=True, show_default=True,
              help="Also build the Triton repository and start tritonserver (CPU) on it.")
@pass_app
def dev_up(app: AppContext, workdir: Path, partitions: int, triton: bool) -> None:
    """Start the services; print their settings as `export` lines (use: eval "$(streamguard dev up)")."""
    wanted = {"kafka", "redis"} | ({"triton"} if triton else set())
    services = [s for s in load_state(workdir) if s.alive()]
    if {s.name for s in services} != wanted:
        for service in services:
            service.stop()
        try:
            services = [start_kafka(workdir), start_redis(workdir)]
            if triton:
                services.append(_start_triton(app, workdir))
        except ServiceError as exc:
            for service in services:
                service.stop()
            raise click.ClickException(str(exc)) from None
        save_state(workdir, services)
    by_name: dict[str, Service] = {s.name: s for s in services}
    w = app.settings.worker
    create_topics(by_name["kafka"].address,
                  {w.input_topic: partitions, w.output_topic: partitions, w.dead_letter_topic: 1})
    click.echo(f"export STREAMGUARD_KAFKA__BOOTSTRAP_SERVERS={by_name['kafka'].address}")
    click.echo(f"export STREAMGUARD_REDIS__URL=redis://{by_name['redis'].address}/0")
    server = by_name.get("triton")
    if isinstance(server, TritonService):
        click.echo(f"export STREAMGUARD_TRITON__URL={server.grpc_address}")


def _start_triton(app: AppContext, workdir: Path) -> TritonService:
    from streamguard.triton.build import build_repository

    try:
        result = build_repository(workdir / "models", device="cpu", backbone=app.settings.backbone)
    except (FileNotFoundError, ValueError) as exc:
        raise ServiceError(f"cannot build the Triton repository: {exc}") from exc
    return start_triton(workdir / "tritonserver", result.repository, list(result.models))


@dev_group.command("down")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=_WORKDIR, show_default=True)
def dev_down(workdir: Path) -> None:
    """Stop the services `dev up` started."""
    stopped = stop_all(workdir)
    click.echo(f"stopped {len(stopped)} services" if stopped else "nothing was running")
