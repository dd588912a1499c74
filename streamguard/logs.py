"""structlog set-up: JSON lines in production, readable output on a terminal. Logs go to stderr so that
commands like ``scan --format jsonl`` keep stdout for results."""

from __future__ import annotations

import logging
import sys

import structlog

from streamguard.config import LogSettings


def configure_logging(settings: LogSettings) -> None:
    level = logging.getLevelNamesMapping()[settings.level.upper()]
    console = settings.format == "console" or (settings.format == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
