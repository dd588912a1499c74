from __future__ import annotations

import json

import pytest
import structlog

from streamguard.config import LogSettings
from streamguard.logs import configure_logging


@pytest.fixture(autouse=True)
def _reset() -> None:
    yield
    structlog.reset_defaults()


def test_json_logs(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings(format="json"))
    structlog.get_logger("t").info("scan.started", files=3)
    line = json.loads(capsys.readouterr().err.strip())
    assert line["event"] == "scan.started" and line["files"] == 3 and line["level"] == "info"
    assert "timestamp" in line


def test_console_logs_and_level_filter(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings(format="console", level="warning"))
    log = structlog.get_logger("t")
    log.info("hidden.event")
    log.warning("shown.event", key="v")
    err = capsys.readouterr().err
    assert "shown.event" in err and "key=v" in err and "hidden.event" not in err
    assert not err.lstrip().startswith("{")
