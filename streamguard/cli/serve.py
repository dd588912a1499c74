"""``streamguard serve``: the synchronous check for upload time, POST /v1/check."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import click

from streamguard.cli.context import AppContext

pass_app = click.make_pass_decorator(AppContext)


@click.command("serve")
@click.option("--host", default=None, help="Address to listen on (default: serve.host).")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default: serve.port; 0: a free one).")
@pass_app
def serve_command(app: AppContext, host: str | None, port: int | None) -> None:
    """Answer POST /v1/check with the verdict the worker would publish, until SIGTERM or SIGINT."""
    from streamguard.serve.app import CheckService, NoApiKeys
    from streamguard.serve.auth import KeyFileError

    settings = app.settings
    overrides = {name: value for name, value in (("host", host), ("port", port)) if value is not None}
    if overrides:
        settings = settings.model_copy(update={"serve": settings.serve.model_copy(update=overrides)})
    try:
        service = CheckService(settings, app.plugin_manager)
    except (NoApiKeys, KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    service.start()
    stop.wait()
    service.stop()
    sys.exit(0)
