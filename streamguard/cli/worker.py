"""``streamguard worker``: the main job — consume image events, publish verdicts and dead letters."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import click

from streamguard.cli.context import AppContext

pass_app = click.make_pass_decorator(AppContext)


@click.command("worker")
@pass_app
def worker_command(app: AppContext) -> None:
    """Join the consumer group and judge events until SIGTERM or SIGINT, then drain and commit."""
    from streamguard.worker.loop import Worker

    worker = Worker(app.settings, app.plugin_manager)

    def _stop(signum: int, frame: FrameType | None) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sys.exit(worker.run())
