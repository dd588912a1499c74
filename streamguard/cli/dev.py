"""``streamguard dev up|down``: a broker, a Redis and a Triton server on loopback with free ports, for development.

Triton serves a repository built by `streamguard triton build` into the work directory, with explicit model
control; the worker uses it when ``STREAMGUARD_DETECTORS__BACKEND=triton``. By default the CLIP detectors
are served on one shared trunk (the trunk, a head each, the ensemble) and `up` exports
``STREAMGUARD_TRITON__TRUNK_MODEL``: the frozen blocks run once per image instead of once per detector.
"""

from __future__ import annotations

import shutil
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
@click.option("--shared-trunk/--whole-models", default=True, show_default=True,
              help="Serve the CLIP detectors on one shared trunk (the ensemble the worker calls with "
                   "triton.trunk_model), or each as its whole model.")
@pass_app
def dev_up(app: AppContext, workdir: Path, partitions: int, triton: bool, shared_trunk: bool) -> None:
    """Start the services; print their settings as `export` lines (use: eval "$(streamguard dev up)")."""
    wanted = {"kafka", "redis"} | ({"triton"} if triton else set())
    services = [s for s in load_state(workdir) if s.alive()]
    if {s.name for s in services} != wanted:
        for service in services:
            service.stop()
        try:
            services = [start_kafka(workdir), start_redis(workdir)]
            if triton:
                services.append(_start_triton(app, workdir, shared_trunk))
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
        from streamguard.triton.shared_trunk import ENSEMBLE_MODEL

        # From what the running server loaded, so a second `up` on services started otherwise says the same.
        if ENSEMBLE_MODEL in server.models:
            click.echo(f"export STREAMGUARD_TRITON__TRUNK_MODEL={ENSEMBLE_MODEL}")


def _start_triton(app: AppContext, workdir: Path, shared_trunk: bool) -> TritonService:
    from streamguard.builtin.cliphead import builtin_detectors
    from streamguard.triton.build import build_repository, default_models

    # What the worker will call under these settings: an opt-in detector (mpft) left out by the worker
    # would still cost its head on every ensemble request.
    loaded = builtin_detectors(app.settings.plugins)
    models = [name for name in default_models() if name in loaded]
    repository = workdir / "models"
    # Ours alone: a model left from an earlier `up` (whole models, a detector since removed) would be listed.
    shutil.rmtree(repository, ignore_errors=True)
    try:
        result = build_repository(repository, device="cpu", backbone=app.settings.backbone, models=models,
                                  shared_trunk=shared_trunk, whole_models=not shared_trunk)
    except (FileNotFoundError, ValueError) as exc:
        raise ServiceError(f"cannot build the Triton repository: {exc}") from exc
    repository.mkdir(parents=True, exist_ok=True)  # every CLIP detector denied: a server with nothing to serve
    return start_triton(workdir / "tritonserver", result.repository, result.model_names())


@dev_group.command("down")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=_WORKDIR, show_default=True)
def dev_down(workdir: Path) -> None:
    """Stop the services `dev up` started."""
    stopped = stop_all(workdir)
    click.echo(f"stopped {len(stopped)} services" if stopped else "nothing was running")
