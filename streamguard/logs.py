"""structlog set-up: JSON lines in production, readable output on a terminal. Logs go to stderr so that
commands like ``scan --format jsonl`` keep stdout for results.

Libraries log through the standard library (kafka-python, redis, grpc); their records are rendered by the
same renderer, so a JSON stream stays JSON, with the library's logger name. They are held at WARNING
(their INFO is chatter such as every broker connection), ours at the configured level.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from streamguard.config import LogSettings

_OURS = "streamguard"
_THIRD_PARTY_LEVEL = logging.WARNING


def configure_logging(settings: LogSettings) -> None:
    level = logging.getLevelNamesMapping()[settings.level.upper()]
    console = settings.format == "console" or (settings.format == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _route_standard_logging(level, renderer, shared)


def _route_standard_logging(
    level: int, renderer: structlog.typing.Processor, shared: list[structlog.typing.Processor]
) -> None:
    """Send the standard library's records through ``renderer`` on stderr, replacing an earlier set-up."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, _THIRD_PARTY_LEVEL))
    logging.getLogger(_OURS).setLevel(level)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record arrives, as structlog's logger does: a stream
    bound once would outlive a redirected or captured stderr."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass  # StreamHandler.__init__ sets it; the property always answers sys.stderr
