from __future__ import annotations

import json
from pathlib import Path

import pytest
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
