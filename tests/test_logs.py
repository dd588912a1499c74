from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from streamguard.config import LogSettings
from streamguard.logs import configure_logging


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("streamguard").setLevel(logging.NOTSET)


def json_lines(err: str) -> list[dict[str, object]]:
    lines = [line for line in err.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line: a bare text line fails here


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


def test_library_logs_become_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings(format="json"))
    logging.getLogger("kafka.conn").warning("x")
    logging.getLogger("redis.connection").error("lost %s after %d tries", "cache:6379", 3)
    (kafka, redis) = json_lines(capsys.readouterr().err)
    assert kafka["event"] == "x" and kafka["logger"] == "kafka.conn" and kafka["level"] == "warning"
    assert "timestamp" in kafka
    assert redis["event"] == "lost cache:6379 after 3 tries" and redis["level"] == "error"


def test_library_tracebacks_stay_inside_the_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings(format="json"))
    try:
        raise ConnectionError("broker gone")
    except ConnectionError:
        logging.getLogger("grpc._channel").exception("call failed")
    (line,) = json_lines(capsys.readouterr().err)
    assert line["logger"] == "grpc._channel" and "ConnectionError: broker gone" in str(line["exception"])


def test_library_info_held_back_ours_at_the_configured_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings(format="json", level="debug"))
    logging.getLogger("kafka.client").info("connecting to broker")
    logging.getLogger("kafka.client").debug("bytes")
    logging.getLogger("streamguard.something").debug("ours")
    structlog.get_logger("t").debug("ours.structlog")
    events = [line["event"] for line in json_lines(capsys.readouterr().err)]
    assert events == ["ours", "ours.structlog"]


def test_reconfiguring_does_not_duplicate_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings(format="json"))
    configure_logging(LogSettings(format="json", level="warning"))
    logging.getLogger("kafka.conn").warning("once")
    assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["once"]


def test_library_logs_in_a_real_process() -> None:
    # kafka-python installs a NullHandler on "kafka": without the bridge its warnings vanish or, for other
    # libraries, come out as bare text.
    code = (
        "import logging, kafka\n"
        "from streamguard.config import LogSettings\n"
        "from streamguard.logs import configure_logging\n"
        "configure_logging(LogSettings(format='json'))\n"
        "logging.getLogger('kafka.conn').warning('x')\n"
        "logging.getLogger('urllib3').warning('y')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [(line["logger"], line["event"]) for line in json_lines(proc.stderr)] == [("kafka.conn", "x"),
                                                                                   ("urllib3", "y")]
