"""``streamguard worker``: the main job — consume image events, publish verdicts and dead letters."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click
import structlog

from streamguard.cli.context import AppContext

pass_app = click.make_pass_decorator(AppContext)

_PARENT_CHECK_S = 1.0


@click.command("worker")
@click.option("--processes", type=click.IntRange(1, 64), default=None,
              help="Worker processes in this pod, each a full consumer of the group (default: worker.processes, "
                   "1). Above 1 a supervisor starts them, restarts one that dies and serves the pod's health.")
@click.option("--health-port-file", type=click.Path(dir_okay=False, path_type=Path), default=None, hidden=True,
              help="A supervisor's child: write the health server's port here.")
@click.option("--parent-pid", type=int, default=None, hidden=True,
              help="A supervisor's child: stop (drain and commit) when this process is no longer the parent.")
@click.option("--child-index", type=int, default=None, hidden=True,
              help="A supervisor's child: its index, added to every log line as worker_process.")
@pass_app
def worker_command(app: AppContext, processes: int | None, health_port_file: Path | None, parent_pid: int | None,
                   child_index: int | None) -> None:
    """Join the consumer group and judge events until SIGTERM or SIGINT, then drain and commit."""
    settings = app.settings  # loads the configuration and sets up logging, before the logs are tagged
    n = processes if processes is not None else settings.worker.processes
    if n > 1:
        _run_supervisor(app, n)
        return
    if child_index is not None:
        _tag_logs(child_index)

    from streamguard.worker.loop import Worker

    worker = Worker(settings, app.plugin_manager)

    def _stop(signum: int, frame: FrameType | None) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if health_port_file is not None:
        worker.on_listening = lambda port: _write_port(health_port_file, port)
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid, worker.stop), name="parent-watch",
                         daemon=True).start()
    sys.exit(worker.run())


def _run_supervisor(app: AppContext, processes: int) -> None:
    from streamguard.worker.supervisor import Supervisor

    config_file = click.get_current_context().find_root().params.get("config_file")
    supervisor = Supervisor(app.settings, processes, config_file)

    def _stop(signum: int, frame: FrameType | None) -> None:
        supervisor.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sys.exit(supervisor.run())


def _write_port(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)  # the supervisor never reads half a number


def _watch_parent(parent_pid: int, stop: Any) -> None:
    """Orphaned (the supervisor was killed): drain and exit rather than run on unsupervised."""
    while os.getppid() == parent_pid:
        threading.Event().wait(_PARENT_CHECK_S)
    structlog.get_logger(__name__).warning("worker.parent_gone", parent_pid=parent_pid)
    stop()


def _tag_logs(index: int) -> None:
    """Every log line of this child says which one it is (the pod's children share one log stream)."""
    config = structlog.get_config()

    def tag(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict.setdefault("worker_process", index)
        return event_dict

    structlog.configure(processors=[tag, *config["processors"]])
