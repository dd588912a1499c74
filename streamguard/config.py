"""Configuration: defaults < TOML file < ``STREAMGUARD_*`` environment < explicit arguments.

Nested fields use ``__`` in the environment: ``STREAMGUARD_POLICY__AI_THRESHOLD=0.9``. The TOML file is the
one named by ``--config`` or ``STREAMGUARD_CONFIG``; without either, none is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote_plus, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "STREAMGUARD_CONFIG"
REDACTED = "**********"

Backend = Literal["inprocess", "triton"]

ALL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntakeSettings(_Section):
    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest encoded image accepted.")
    max_pixels: int = Field(
        50_000_000, gt=0, description="Largest width*height decoded; larger is refused before decoding."
    )
    formats: list[str] = Field(
        default_factory=lambda: list(ALL_FORMATS),
        description="Accepted formats; multi-picture JPEGs (MPO, from phone cameras) count as JPEG.",
    )
    max_aspect_ratio: float = Field(
        20.0, ge=1.0, description="Largest long side / short side; more extreme strips are refused before decoding."
    )
    batch_pixel_budget: int = Field(
        64_000_000,
        gt=0,
        description="Decoded pixels a batch may hold at once (estimated from headers); a larger batch is decoded "
        "and judged in chunks under it. One image over it still goes alone.",
    )


class PluginSettings(_Section):
    allow: list[str] | None = Field(
        None, description="If set, only these plugins load (entry-point or built-in names)."
    )
    deny: list[str] = Field(default_factory=list, description="Plugins never loaded.")
    trace_hooks: bool = Field(False, description="Log every hook call and its result.")


class DetectorSettings(_Section):
    timeout_s: float | None = Field(
        30.0, gt=0, description="Per call of one detector on one batch, in the worker; None waits as long as the "
        "model takes. scan, eval and calibrate wait unless given --detector-timeout: offline, a slow model is "
        "no reason to lose the image.",
    )
    batch_size: int = Field(16, gt=0)
    breaker_failures: int = Field(5, gt=0, description="Consecutive failures that open the breaker.")
    breaker_reset_s: float = Field(30.0, gt=0, description="How long an open breaker refuses calls.")
    device: str = Field("cpu", description="torch device of the in-process backend.")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-detector options, keyed by detector name."
    )
    backend: Backend = Field(
        "inprocess", description="Where detectors run: in this process (torch) or on a Triton server (see [triton])."
    )
    backend_overrides: dict[str, Backend] = Field(
        default_factory=dict, description="Per-detector exceptions to `backend`, keyed by detector name."
    )

    def backend_for(self, detector: str) -> Backend:
        return self.backend_overrides.get(detector, self.backend)


class TritonSettings(_Section):
    """The Triton backend: how the worker talks to the model server (gRPC, asyncio)."""

    url: str = Field("127.0.0.1:8001", description="Triton's gRPC address, host:port.")
    models: dict[str, str] = Field(
        default_factory=dict, description="Triton model name per detector, where it differs from the detector's own."
    )
    request_batch_size: int = Field(
        4, gt=0, description="Images per request. Small requests, many in flight, let Triton's batcher fill batches."
    )
    max_requests_in_flight: int = Field(16, gt=0, description="Concurrent requests per model.")
    request_timeout_s: float = Field(10.0, gt=0, description="Per request, queueing on the server included.")
    retry_budget_s: float = Field(
        10.0, gt=0, description="How long one call retries an unavailable server before the outage is declared. "
        "Keep it plus request_timeout_s below detectors.timeout_s."
    )
    backoff_initial_s: float = Field(0.1, gt=0)
    backoff_max_s: float = Field(2.0, gt=0)
    breaker_failures: int = Field(3, gt=0, description="Failed calls in a row that open the model's breaker.")
    breaker_reset_s: float = Field(5.0, gt=0, description="How long an open breaker answers without asking Triton.")
    ready_cache_s: float = Field(1.0, ge=0, description="How long a model-readiness answer is reused.")

    @model_validator(mode="after")
    def _check_backoff(self) -> TritonSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        return self


# Chosen by leave-one-source-out validation of the shipped detectors (`streamguard train loso`, see
# docs/validation.md), never on the test split. The weights average 1, `default_weight`, so a detector
# without an entry counts as an average one. pin-clip's 0: on unseen sources it only lowered the other two
# (balanced AUC of all three at equal weights 0.930, of univfd and mpft alone 0.940). It is still scored
# and published, so it can be watched; operators who do not want to pay for it deny `builtin-pinclip`.
VALIDATED_WEIGHTS: dict[str, float] = {"univfd": 1.2, "pin-clip": 0.0, "mpft": 1.8}
# No held-out real source had more than 5% of its photos flagged at 0.99 (the worst: 3.8%); generators
# had 1.9% of their images cleared as real at 0.5, on average.
VALIDATED_AI_THRESHOLD = 0.99
VALIDATED_REAL_THRESHOLD = 0.5


class FusionSettings(_Section):
    weights: dict[str, float] = Field(
        default_factory=lambda: dict(VALIDATED_WEIGHTS),
        description="Weight per detector name, merged over the validated defaults; 0 leaves a detector out.")
    default_weight: float = Field(1.0, ge=0, description="Weight of a detector the table does not name.")

    @field_validator("weights", mode="before")
    @classmethod
    def _over_validated(cls, value: Any) -> Any:
        # Merged, not replaced: weighting one extra detector must not silently undo the validated ones.
        return {**VALIDATED_WEIGHTS, **value} if isinstance(value, dict) else value


class PolicySettings(_Section):
    ai_threshold: float = Field(VALIDATED_AI_THRESHOLD, ge=0, le=1,
                                description="Fused probability at or above: ai_generated.")
    real_threshold: float = Field(VALIDATED_REAL_THRESHOLD, ge=0, le=1,
                                  description="Fused probability at or below: real.")

    @model_validator(mode="after")
    def _ordered(self) -> PolicySettings:
        if self.real_threshold >= self.ai_threshold:
            raise ValueError("real_threshold must be below ai_threshold")
        return self


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # Off by default: the worker's bytes are mostly dead-letter images, already compressed (JPEG, PNG,
    # WebP), and small verdicts; a codec would cost CPU the detectors want, and would oblige every reader of
    # the verdicts to have the codec library (a missing one kills a kafka-python consumer). Records read
    # are decoded whatever this says: every codec's library is installed.
    compression_type: Literal[None, "gzip", "snappy", "lz4", "zstd"] = Field(
        None, description="Codec of what the worker (and `streamguard produce`) publishes; none, as Kafka "
        "spells it, means off.")

    # kafka-python waits 30 s for a first broker; a worker that cannot reach any should say so sooner and
    # let its supervisor restart it.
    bootstrap_timeout_s: float = Field(
        10.0, gt=0, description="How long a client waits to reach a first broker before failing.")

    @field_validator("compression_type", mode="before")
    @classmethod
    def _none_spelled_out(cls, value: Any) -> Any:
        # Kafka and librdkafka spell "off" as "none"; an environment variable cannot say null.
        return None if isinstance(value, str) and value.strip().lower() in ("none", "") else value

    def client_config(self) -> dict[str, Any]:
        """Connection settings shared by every kafka-python client (consumer, producer, admin)."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "bootstrap_timeout_ms": int(self.bootstrap_timeout_s * 1000),
        }
        if self.sasl_mechanism:
            config |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            }
        return config


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    socket_timeout_s: float = Field(0.5, gt=0, description="Per Redis command; dedupe must never stall the stream.")
    retry_interval_s: float = Field(1.0, gt=0, description="While Redis is down, how often to try it again.")

    @field_serializer("url")
    def _redact_password(self, url: str) -> str:
        # A Redis URL may carry credentials (user:password@, or ?password= which redis-py also reads);
        # printing config must never show them.
        parts = urlsplit(url)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        netloc = parts.netloc
        if at and ":" in userinfo:
            # Rebuilt from the raw netloc, not hostname and port, which would drop IPv6 brackets.
            netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{hostport}"
        query = self._redact_query(parts.query)
        if (netloc, query) == (parts.netloc, parts.query):
            return url
        # By hand, not urlunsplit, which writes unix:///path as unix:/path.
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "") + (
            f"#{parts.fragment}" if parts.fragment else "")

    @staticmethod
    def _redact_query(query: str) -> str:
        """``query`` with the value of every parameter whose name mentions a password replaced."""
        params = []
        for param in query.split("&") if query else ():
            name, eq, _ = param.partition("=")
            params.append(f"{name}={REDACTED}" if eq and "password" in unquote_plus(name).lower() else param)
        return "&".join(params)


class FetchSettings(_Section):
    """Fetching images named by URI. Private, loopback and link-local addresses are refused (SSRF)
    unless allow-listed."""

    connect_timeout_s: float = Field(3.0, gt=0)
    timeout_s: float = Field(10.0, gt=0, description="Whole fetch, redirects included.")
    max_redirects: int = Field(3, ge=0)
    max_bytes: int | None = Field(None, gt=0, description="Defaults to intake.max_bytes.")
    allow_networks: list[str] = Field(
        default_factory=list, description="CIDRs allowed even when private/loopback, e.g. 10.1.0.0/16."
    )
    user_agent: str = "streamguard-fetch/1"


class DedupeSettings(_Section):
    enabled: bool = True
    namespace: str = Field("sg", description="Key prefix, so several deployments can share a Redis.")
    ttl_s: int = Field(7 * 24 * 3600, gt=0, description="How long a verdict is reused.")
    # Short, and renewed while the holder scores: a killed holder delays other workers' copies by at most
    # this long, while a slow but live one keeps its lease.
    lease_ms: int = Field(10_000, gt=0, description="In-flight lease while one worker scores content.")
    lease_wait_max_s: float = Field(
        120.0, gt=0, description="Longest a copy waits on another worker's renewed lease before scoring it anyway."
    )
    near: bool = True
    near_max_distance: int = Field(31, ge=0, le=64, description="PDQ Hamming distance for a near-duplicate.")
    near_min_quality: int = Field(50, ge=0, le=100, description="PDQ hashes of lower quality are not used.")
    near_action: Literal["reuse", "annotate"] = Field(
        "annotate", description="reuse: publish the matched verdict; annotate: score anyway, note the match."
    )


class WorkerSettings(_Section):
    group_id: str = "streamguard"
    input_topic: str = "images"
    output_topic: str = "verdicts"
    dead_letter_topic: str = "images.dlq"
    max_in_flight: int = Field(256, gt=0, description="Records polled but not yet committed, in total.")
    max_in_flight_per_partition: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0, description="Records scored together.")
    batch_wait_ms: int = Field(20, ge=0, description="How long to wait to fill a batch.")
    commit_interval_s: float = Field(1.0, gt=0)
    poll_timeout_ms: int = Field(100, gt=0)
    max_poll_interval_ms: int = Field(300_000, gt=0)
    session_timeout_ms: int = Field(10_000, gt=0)
    heartbeat_interval_ms: int = Field(3_000, gt=0)
    drain_timeout_s: float = Field(20.0, gt=0, description="SIGTERM budget; keep below the pod's grace period.")
    max_record_bytes: int = Field(25 * 1024 * 1024, gt=0)
    max_header_bytes: int = Field(
        64 * 1024, gt=0, description="Largest total of a record's header names and values; over it: a dead letter."
    )
    dead_letter_max_value_bytes: int = Field(
        1_000_000, ge=0, description="Larger original values are left out of the dead letter (headers say so)."
    )
    dead_letter_max_header_bytes: int = Field(
        64 * 1024, ge=0, description="Original headers copied into a dead letter, at most; the rest are left out "
        "(a header says how many), so a dead letter never outgrows what the producer can send."
    )
    strict_events: bool = Field(
        False, description="Refuse events with fields this version does not know (default: drop and count them; "
        "producers add fields before consumers upgrade)."
    )
    health_host: str = Field(
        "0.0.0.0", description="Address /healthz, /readyz and /metrics listen on. 0.0.0.0 because Kubernetes "
        "probes and Prometheus come from outside the pod; 127.0.0.1 keeps them local, :: listens on IPv6.",
    )
    health_port: int = Field(8080, ge=0, description="0 picks a free port.")
    health_max_connections: int = Field(
        256, gt=0, description="Health connections open at once; over it a new one is closed at once. An idle "
        "connection costs a file descriptor, not a thread.",
    )
    health_connection_timeout_s: float = Field(
        5.0, gt=0, description="A health connection silent this long (no request yet, or mid-request) is closed.",
    )
    liveness_timeout_s: float = Field(30.0, gt=0, description="/healthz fails when the poll loop stalls this long.")
    outage_check_s: float = Field(
        1.0, gt=0, description="While a detector's server is unavailable, how often to ask whether it is back."
    )


class BackboneSettings(_Section):
    """The CLIP image encoder every built-in detector stands on."""

    cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "streamguard",
        description="Where `streamguard backbone fetch` writes the converted weights.",
    )
    checkpoint: Path | None = Field(
        None,
        description="Operator-supplied weights instead of the cache: a transformers CLIP directory, or an "
        "OpenAI / open_clip state dict file (ViT-L/14 included).",
    )


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON otherwise."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMGUARD_",
        env_nested_delimiter="__",
        extra="forbid",
        # Set per instance by `load_settings`; None means no file.
        toml_file=None,
    )

    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    plugins: PluginSettings = Field(default_factory=PluginSettings)
    detectors: DetectorSettings = Field(default_factory=DetectorSettings)
    fusion: FusionSettings = Field(default_factory=FusionSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    backbone: BackboneSettings = Field(default_factory=BackboneSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _triton_fits_in_the_detector_timeout(self) -> Settings:
        uses_triton = self.detectors.backend == "triton" or "triton" in self.detectors.backend_overrides.values()
        needed = self.triton.retry_budget_s + self.triton.request_timeout_s
        timeout = self.detectors.timeout_s
        if uses_triton and timeout is not None and timeout <= needed:
            # Else the runner's timeout fires first and an outage becomes error scores instead of a hold.
            raise ValueError(
                f"detectors.timeout_s ({self.detectors.timeout_s:g}) must exceed triton.retry_budget_s + "
                f"triton.request_timeout_s ({needed:g})"
            )
        return self

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as JSON-able data, secrets replaced."""
        return self.model_dump(mode="json")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the file named here or by ``STREAMGUARD_CONFIG``, the environment, overrides."""
    path = config_file or os.environ.get(CONFIG_ENV)
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")

    # pydantic-settings reads the TOML path from the class config, so bind it in a one-off subclass.
    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    return FileSettings(**overrides)
