from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from streamguard.cli import cli
from streamguard.config import VALIDATED_AI_THRESHOLD, VALIDATED_REAL_THRESHOLD, VALIDATED_WEIGHTS, load_settings


def test_defaults() -> None:
    settings = load_settings()
    assert settings.plugins.allow is None
    assert settings.policy.ai_threshold == VALIDATED_AI_THRESHOLD
    assert settings.policy.real_threshold == VALIDATED_REAL_THRESHOLD
    assert settings.fusion.weights == VALIDATED_WEIGHTS
    assert "JPEG" in settings.intake.formats


def test_environment_overrides_nested_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_POLICY__AI_THRESHOLD", "0.9")
    monkeypatch.setenv("STREAMGUARD_PLUGINS__DENY", '["provenance"]')
    settings = load_settings()
    assert settings.policy.ai_threshold == 0.9 and settings.plugins.deny == ["provenance"]


def test_toml_file_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sg.toml"
    config.write_text("[policy]\nai_threshold = 0.7\nreal_threshold = 0.1\n[fusion.weights]\nunivfd = 2.0\n")
    settings = load_settings(config)
    assert settings.policy.ai_threshold == 0.7
    # Weighting one detector keeps the validated weights of the others.
    assert settings.fusion.weights == {**VALIDATED_WEIGHTS, "univfd": 2.0}
    monkeypatch.setenv("STREAMGUARD_POLICY__AI_THRESHOLD", "0.75")
    assert load_settings(config).policy.ai_threshold == 0.75  # the environment beats the file
    monkeypatch.setenv("STREAMGUARD_CONFIG", str(config))
    assert load_settings().policy.real_threshold == 0.1


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.toml")


def test_config_show_redacts_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_KAFKA__SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("STREAMGUARD_REDIS__URL", "redis://default:s3cret@cache.internal:6380/1")
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert "hunter2" not in result.stdout and "s3cret" not in result.stdout
    assert shown["kafka"]["sasl_password"] == "**********"
    assert shown["redis"]["url"] == "redis://default:**********@cache.internal:6380/1"
    assert load_settings().redis.url.endswith("s3cret@cache.internal:6380/1")  # only the display is redacted


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://host/0?password=s3cret", "redis://host/0?password=**********"),
        ("redis://host/0?db=1&password=s3cret&socket_timeout=1",
         "redis://host/0?db=1&password=**********&socket_timeout=1"),
        ("rediss://host/0?ssl_password=s3cret", "rediss://host/0?ssl_password=**********"),
        ("unix:///run/redis.sock?Password=s3cret", "unix:///run/redis.sock?Password=**********"),
        ("redis://:s3cret@[::1]:6379/0", "redis://:**********@[::1]:6379/0"),
        ("redis://sg:s3cret@[2001:db8::7]/2", "redis://sg:**********@[2001:db8::7]/2"),
        ("redis://:p@s3cret@cache:6379/0", "redis://:**********@cache:6379/0"),  # an unescaped @ in it
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),  # nothing to hide: untouched
        ("redis://sg@cache/0", "redis://sg@cache/0"),  # a user name alone is no secret
    ],
)
def test_redis_url_redaction(url: str, shown: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_REDIS__URL", url)
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.stdout
    assert json.loads(result.stdout)["redis"]["url"] == shown
    assert load_settings().redis.url == url  # the worker still connects with the real one


def test_invalid_config_is_a_clear_cli_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_POLICY__AI_THRESHOLD", "lots")
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 1 and "invalid configuration" in result.output


def test_schema_command_prints_every_schema() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    assert set(json.loads(result.stdout)) == {"image-event", "detector-score", "verdict", "dead-letter"}
    one = json.loads(CliRunner().invoke(cli, ["schema", "verdict"]).stdout)
    assert one["title"] == "Verdict"


def test_kafka_clients_share_connection_settings() -> None:
    from streamguard.worker.loop import consumer_config
    from streamguard.worker.publish import producer_config

    settings = load_settings(kafka={"bootstrap_servers": "k:9093", "security_protocol": "SASL_SSL",
                                    "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "sg",
                                    "sasl_password": "hunter2"})
    for config in (consumer_config(settings), producer_config(settings)):
        assert config["bootstrap_servers"] == "k:9093" and config["security_protocol"] == "SASL_SSL"
        assert config["sasl_mechanism"] == "SCRAM-SHA-512" and config["sasl_plain_password"] == "hunter2"
    assert "sasl_mechanism" not in consumer_config(load_settings())


def test_triton_retries_must_fit_in_the_detector_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_DETECTORS__TIMEOUT_S", "12")
    assert load_settings().detectors.timeout_s == 12  # fine while everything runs in-process
    monkeypatch.setenv("STREAMGUARD_DETECTORS__BACKEND", "triton")
    with pytest.raises(ValueError, match="must exceed triton.retry_budget_s"):
        load_settings()
    monkeypatch.setenv("STREAMGUARD_TRITON__RETRY_BUDGET_S", "1")
    assert load_settings().detectors.backend_for("univfd") == "triton"


# -- detector timeout: the worker's budget, none offline ---------------------------------------------------


@pytest.fixture
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # the in-process CLI bound logging to CliRunner's stderr


def test_worker_keeps_its_detector_timeout_offline_commands_have_none() -> None:
    from streamguard.cli.context import AppContext

    app = AppContext(None)
    assert app.settings.detectors.timeout_s == 30.0  # what the worker runs with
    offline = app.offline_settings(None)
    assert offline.detectors.timeout_s is None
    assert offline.detectors.batch_size == app.settings.detectors.batch_size  # nothing else changes
    assert app.offline_settings(12.5).detectors.timeout_s == 12.5
    assert app.settings.detectors.timeout_s == 30.0


def test_no_detector_timeout_passes_the_triton_check() -> None:
    settings = load_settings(detectors={"backend": "triton", "timeout_s": None})
    assert settings.detectors.timeout_s is None


@pytest.mark.parametrize("command", ["scan", "eval", "calibrate"])
def test_offline_commands_take_a_detector_timeout(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert "--detector-timeout" in result.output and "no limit" in result.output


@pytest.mark.usefixtures("_reset_logging")
def test_eval_waits_for_a_slow_detector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_eval_datasets import labelled_dirs

    labelled_dirs(tmp_path / "data", "0_real", "1_fake", 2)
    monkeypatch.setenv("STREAMGUARD_DETECTORS__TIMEOUT_S", "0.1")  # the worker's budget, far too short here
    monkeypatch.setenv("STREAMGUARD_DETECTORS__OPTIONS", '{"brightness": {"delay_s": 0.6}}')
    args = ["eval", str(tmp_path / "data"), "--detector", "brightness", "--no-normalized-check", "--no-cache",
            "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "n=4 " in result.output and "errors=0 " in result.output
    timed_out = CliRunner().invoke(cli, [*args, "--detector-timeout", "0.1"])
    assert "errors=4 " in timed_out.output
