from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner

from streamguard.cli import cli
from stack import TEST_POLICY
from streamguard.config import (
    VALIDATED_AI_THRESHOLD,
    VALIDATED_FUSED_BIAS,
    VALIDATED_FUSED_SCALE,
    VALIDATED_REAL_THRESHOLD,
    VALIDATED_WEIGHTS,
    load_settings,
)


@pytest.fixture(autouse=True)
def _shipped_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the shipped defaults and their precedence, not the policy others pin."""
    for name in TEST_POLICY:
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.plugins.allow is None
    assert settings.policy.ai_threshold == VALIDATED_AI_THRESHOLD
    assert settings.policy.real_threshold == VALIDATED_REAL_THRESHOLD
    assert settings.fusion.weights == VALIDATED_WEIGHTS
    assert (settings.fusion.scale, settings.fusion.bias) == (VALIDATED_FUSED_SCALE, VALIDATED_FUSED_BIAS)
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
    assert set(json.loads(result.stdout)) == {"image-event", "detector-score", "verdict", "dead-letter",
                                               "review-request", "review-decision"}
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


# -- transport security: Kafka TLS and SASL, Redis TLS, Triton TLS and targets -------------------------------------


def _pem(tmp_path: Path, name: str, text: str = "-----BEGIN CERTIFICATE-----\n") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _kafka_python_accepts(config: dict[str, Any]) -> None:
    """Every key is a configuration kafka-python's clients know (they refuse unknown ones)."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert set(config) <= set(client.DEFAULT_CONFIG), (client.__name__, set(config) - set(client.DEFAULT_CONFIG))


def test_kafka_defaults_are_plaintext_with_a_client_id() -> None:
    kafka = load_settings().kafka
    assert kafka.client_id == "streamguard" and kafka.ssl_check_hostname is True and kafka.sasl_mechanism is None
    config = kafka.client_config()
    assert config["client_id"] == "streamguard" and config["security_protocol"] == "PLAINTEXT"
    assert not any(key.startswith(("ssl_", "sasl_")) for key in config)
    _kafka_python_accepts(config)


def test_kafka_tls_settings_map_to_kafka_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = _pem(tmp_path, "ca.pem"), _pem(tmp_path, "client.pem"), _pem(tmp_path, "client.key")
    for name, value in {"SECURITY_PROTOCOL": "SASL_SSL", "SSL_CAFILE": str(ca), "SSL_CERTFILE": str(cert),
                        "SSL_KEYFILE": str(key), "SSL_PASSWORD": "k3y", "SSL_CHECK_HOSTNAME": "false",
                        "CLIENT_ID": "sg-prod", "SASL_MECHANISM": "PLAIN", "SASL_USERNAME": "sg",
                        "SASL_PASSWORD": "hunter2"}.items():
        monkeypatch.setenv(f"STREAMGUARD_KAFKA__{name}", value)
    config = load_settings().kafka.client_config()
    assert {k: v for k, v in config.items() if k.startswith(("ssl_", "sasl_", "client_id", "security"))} == {
        "security_protocol": "SASL_SSL", "client_id": "sg-prod", "ssl_check_hostname": False,
        "ssl_cafile": str(ca), "ssl_certfile": str(cert), "ssl_keyfile": str(key), "ssl_password": "k3y",
        "sasl_mechanism": "PLAIN", "sasl_plain_username": "sg", "sasl_plain_password": "hunter2",
    }
    _kafka_python_accepts(config)


def test_kafka_ssl_without_files_verifies_with_the_system_roots() -> None:
    config = load_settings(kafka={"security_protocol": "SSL"}).kafka.client_config()
    assert config["ssl_cafile"] is None and config["ssl_check_hostname"] is True and "sasl_mechanism" not in config


def test_kafka_oauthbearer_reads_the_token_file_at_every_authentication(tmp_path: Path) -> None:
    from kafka.net.sasl.oauth import AbstractTokenProvider, SaslMechanismOAuth

    token_file = tmp_path / "token"
    token_file.write_text("token-one\n")
    kafka = load_settings(kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER",
                                 "sasl_oauth_token_file": str(token_file)}).kafka
    config = kafka.client_config()
    _kafka_python_accepts(config)
    provider = config["sasl_oauth_token_provider"]
    assert config["sasl_mechanism"] == "OAUTHBEARER" and isinstance(provider, AbstractTokenProvider)
    assert "sasl_plain_password" not in config

    # kafka-python's own OAUTHBEARER mechanism, as a connection runs it.
    assert b"auth=Bearer token-one\x01" in SaslMechanismOAuth(**config).auth_bytes()
    token_file.write_text("token-two")  # Kubernetes rotated the projected token
    assert b"auth=Bearer token-two\x01" in SaslMechanismOAuth(**config).auth_bytes()
    assert "token-two" not in repr(provider)

    token_file.write_text("  \n")
    with pytest.raises(ValueError, match="token file .* is empty"):
        provider.token()
    token_file.unlink()
    with pytest.raises(OSError, match="token file"):
        provider.token()


@pytest.mark.parametrize(("fields", "message"), [
    ({"security_protocol": "SSL", "ssl_cafile": "{tmp}/missing.pem"}, "kafka.ssl_cafile: no such file"),
    ({"ssl_cafile": "{ca}"}, "kafka.ssl_cafile is set but kafka.security_protocol is PLAINTEXT"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
      "sasl_password": "p", "ssl_cafile": "{ca}"}, "would not use TLS"),
    ({"security_protocol": "SSL", "ssl_keyfile": "{ca}"}, "kafka.ssl_keyfile needs kafka.ssl_certfile"),
    ({"security_protocol": "SSL", "ssl_password": "x"}, "kafka.ssl_password decrypts the client key"),
    ({"security_protocol": "SASL_SSL"}, "SASL_SSL needs kafka.sasl_mechanism"),
    ({"security_protocol": "SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"},
     "kafka.security_protocol is SSL: use SASL_SSL"),
    ({"sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "u", "sasl_password": "p"}, "is PLAINTEXT: use SASL_SSL"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u"},
     "SCRAM-SHA-512 needs kafka.sasl_password"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"},
     "PLAIN needs kafka.sasl_username and kafka.sasl_password"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"}, "OAUTHBEARER needs kafka.sasl_oauth_token"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token_file": "{tmp}/none"},
     "kafka.sasl_oauth_token_file: no such file"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token_file": "{ca}",
      "sasl_username": "u"}, "not used by OAUTHBEARER"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p",
      "sasl_oauth_token_file": "{ca}"}, "sasl_oauth_token_file is for OAUTHBEARER, not PLAIN"),
    ({"sasl_oauth_token_file": "{ca}"}, "sasl_oauth_token_file is set but kafka.sasl_mechanism is not OAUTHBEARER"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
])
def test_kafka_security_settings_are_checked(fields: dict[str, str], message: str, tmp_path: Path) -> None:
    ca = _pem(tmp_path, "ca.pem")
    kafka = {k: v.format(tmp=tmp_path, ca=ca) for k, v in fields.items()}
    with pytest.raises(ValueError, match=message):
        load_settings(kafka=kafka)


def test_empty_values_from_the_chart_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SASL_MECHANISM", "SSL_CAFILE", "SSL_CERTFILE", "SSL_KEYFILE", "SSL_PASSWORD", "SASL_USERNAME",
                 "SASL_PASSWORD", "SASL_OAUTH_TOKEN_FILE"):
        monkeypatch.setenv(f"STREAMGUARD_KAFKA__{name}", "")
    monkeypatch.setenv("STREAMGUARD_REDIS__SSL_CA_CERTS", "")
    monkeypatch.setenv("STREAMGUARD_TRITON__ROOT_CERTIFICATES", "")
    settings = load_settings()
    assert settings.kafka.sasl_mechanism is None and settings.kafka.ssl_cafile is None
    assert settings.kafka.sasl_password is None and settings.kafka.sasl_oauth_token_file is None
    assert settings.redis.ssl_ca_certs is None and settings.triton.root_certificates is None


def test_config_show_redacts_tls_and_sasl_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = _pem(tmp_path, "ca.pem"), _pem(tmp_path, "client.pem"), _pem(tmp_path, "client.key")
    token = _pem(tmp_path, "token", "eyJ-the-bearer-token")
    env = {
        "KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "KAFKA__SSL_CAFILE": str(ca), "KAFKA__SSL_CERTFILE": str(cert),
        "KAFKA__SSL_KEYFILE": str(key), "KAFKA__SSL_PASSWORD": "k3y-s3cret", "KAFKA__SASL_MECHANISM": "OAUTHBEARER",
        "KAFKA__SASL_OAUTH_TOKEN_FILE": str(token),
        "REDIS__URL": "rediss://default:r3dis-s3cret@cache.internal:6380/0", "REDIS__SSL_CA_CERTS": str(ca),
        "TRITON__URL": "dns:///triton-headless.ml.svc:8001", "TRITON__SSL": "true",
        "TRITON__ROOT_CERTIFICATES": str(ca),
    }
    for name, value in env.items():
        monkeypatch.setenv(f"STREAMGUARD_{name}", value)
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 0, result.output
    for secret in ("k3y-s3cret", "r3dis-s3cret", "eyJ-the-bearer-token"):
        assert secret not in result.output
    shown = json.loads(result.stdout)
    assert shown["kafka"]["ssl_password"] == "**********" and shown["kafka"]["sasl_password"] is None
    assert shown["kafka"]["sasl_oauth_token_file"] == str(token)  # where the token is, never what it is
    assert shown["kafka"]["ssl_cafile"] == str(ca) and shown["kafka"]["client_id"] == "streamguard"
    assert shown["redis"]["url"] == "rediss://default:**********@cache.internal:6380/0"
    assert shown["redis"]["ssl_ca_certs"] == str(ca)
    assert shown["triton"]["ssl"] is True and shown["triton"]["url"] == "dns:///triton-headless.ml.svc:8001"


def test_redis_tls_options(tmp_path: Path) -> None:
    ca, cert, key = _pem(tmp_path, "ca.pem"), _pem(tmp_path, "client.pem"), _pem(tmp_path, "client.key")
    assert load_settings().redis.tls_options() == {}
    redis = load_settings(redis={"url": "rediss://cache:6380/0", "ssl_ca_certs": str(ca), "ssl_certfile": str(cert),
                                 "ssl_keyfile": str(key)}).redis
    assert redis.tls_options() == {"ssl_ca_certs": str(ca), "ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    assert load_settings(redis={"url": "rediss://cache:6380/0"}).redis.tls_options() == {}  # the system's roots


@pytest.mark.parametrize(("fields", "message"), [
    ({"url": "redis://cache/0", "ssl_ca_certs": "{ca}"}, "redis.url is redis://, not rediss://"),
    ({"url": "rediss://cache/0", "ssl_ca_certs": "{tmp}/missing.pem"}, "redis.ssl_ca_certs: no such file"),
    ({"url": "rediss://cache/0", "ssl_keyfile": "{ca}"}, "redis.ssl_keyfile needs redis.ssl_certfile"),
])
def test_redis_tls_settings_are_checked(fields: dict[str, str], message: str, tmp_path: Path) -> None:
    ca = _pem(tmp_path, "ca.pem")
    with pytest.raises(ValueError, match=message):
        load_settings(redis={k: v.format(tmp=tmp_path, ca=ca) for k, v in fields.items()})


@pytest.mark.parametrize(("fields", "message"), [
    ({"root_certificates": "{ca}"}, "triton.root_certificates is set but triton.ssl is false"),
    ({"ssl": True, "root_certificates": "{tmp}/missing.pem"}, "triton.root_certificates: no such file"),
    ({"ssl": True, "private_key": "{ca}"}, "private_key and triton.certificate_chain go together"),
    ({"ssl": True, "certificate_chain": "{ca}"}, "private_key and triton.certificate_chain go together"),
    ({"url": "dns:///triton-headless"}, "needs a port"),
    ({"url": "triton-a:8001,triton-b:8001"}, "a list must be IP:port addresses of one family"),
    ({"url": "10.0.0.5:8001,[fd00::6]:8001"}, "a list must be IP:port addresses of one family"),
    ({"url": " "}, "is not a gRPC target"),
])
def test_triton_tls_and_target_settings_are_checked(fields: dict[str, Any], message: str, tmp_path: Path) -> None:
    ca = _pem(tmp_path, "ca.pem")
    triton = {k: v.format(tmp=tmp_path, ca=ca) if isinstance(v, str) else v for k, v in fields.items()}
    with pytest.raises(ValueError, match=message):
        load_settings(triton=triton)


@pytest.mark.parametrize(("url", "target"), [
    ("127.0.0.1:8001", "127.0.0.1:8001"),
    ("triton.ml.svc:8001", "triton.ml.svc:8001"),
    ("dns:///triton-headless.ml.svc.cluster.local:8001", "dns:///triton-headless.ml.svc.cluster.local:8001"),
    ("10.0.0.5:8001, 10.0.0.6:8001", "ipv4:10.0.0.5:8001,10.0.0.6:8001"),
    ("[fd00::5]:8001,[fd00::6]:8001", "ipv6:[fd00::5]:8001,[fd00::6]:8001"),
    ("ipv4:10.0.0.5:8001,10.0.0.6:8001", "ipv4:10.0.0.5:8001,10.0.0.6:8001"),
])
def test_triton_url_forms(url: str, target: str) -> None:
    assert load_settings(triton={"url": url}).triton.grpc_target() == target


def test_triton_tls_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = _pem(tmp_path, "ca.pem"), _pem(tmp_path, "client.pem"), _pem(tmp_path, "client.key")
    triton = load_settings().triton
    assert triton.ssl is False and triton.root_certificates is None
    for name, value in {"SSL": "true", "ROOT_CERTIFICATES": str(ca), "PRIVATE_KEY": str(key),
                        "CERTIFICATE_CHAIN": str(cert)}.items():
        monkeypatch.setenv(f"STREAMGUARD_TRITON__{name}", value)
    triton = load_settings().triton
    assert (triton.ssl, triton.root_certificates, triton.private_key, triton.certificate_chain) == (True, ca, key, cert)


def test_sasl_mechanism_is_case_insensitive() -> None:
    kafka = load_settings(kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "scram-sha-256",
                                 "sasl_username": "u", "sasl_password": "p"}).kafka
    assert kafka.client_config()["sasl_mechanism"] == "SCRAM-SHA-256"
    assert load_settings(kafka={"sasl_mechanism": "none"}).kafka.sasl_mechanism is None


def test_a_validation_error_never_quotes_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_REDIS__URL", "redis://:s3cret@h/0")
    monkeypatch.setenv("STREAMGUARD_DETECTORS__BACKEND", "triton")
    monkeypatch.setenv("STREAMGUARD_DETECTORS__TIMEOUT_S", "12")
    with pytest.raises(ValueError) as failed:
        load_settings()
    assert "timeout_s" in str(failed.value) and "s3cret" not in str(failed.value)
