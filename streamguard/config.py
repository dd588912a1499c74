"""Configuration: defaults < TOML file < ``STREAMGUARD_*`` environment < explicit arguments.

Nested fields use ``__`` in the environment: ``STREAMGUARD_POLICY__AI_THRESHOLD=0.9``. The TOML file is the
one named by ``--config`` or ``STREAMGUARD_CONFIG``; without either, none is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "STREAMGUARD_CONFIG"
REDACTED = "**********"

ALL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntakeSettings(_Section):
    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest encoded image accepted.")
    max_pixels: int = Field(
        50_000_000, gt=0, description="Largest width*height decoded; larger is refused before decoding."
    )
    formats: list[str] = Field(default_factory=lambda: list(ALL_FORMATS))


class PluginSettings(_Section):
    allow: list[str] | None = Field(
        None, description="If set, only these plugins load (entry-point or built-in names)."
    )
    deny: list[str] = Field(default_factory=list, description="Plugins never loaded.")
    trace_hooks: bool = Field(False, description="Log every hook call and its result.")


class DetectorSettings(_Section):
    timeout_s: float = Field(30.0, gt=0, description="Per call of one detector on one batch.")
    batch_size: int = Field(16, gt=0)
    breaker_failures: int = Field(5, gt=0, description="Consecutive failures that open the breaker.")
    breaker_reset_s: float = Field(30.0, gt=0, description="How long an open breaker refuses calls.")
    device: str = Field("cpu", description="torch device of the in-process backend.")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-detector options, keyed by detector name."
    )


class FusionSettings(_Section):
    weights: dict[str, float] = Field(default_factory=dict, description="Weight per detector name.")
    default_weight: float = Field(1.0, ge=0)


class PolicySettings(_Section):
    ai_threshold: float = Field(0.8, ge=0, le=1, description="Fused probability at or above: ai_generated.")
    real_threshold: float = Field(0.2, ge=0, le=1, description="Fused probability at or below: real.")

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


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"

    @field_serializer("url")
    def _redact_password(self, url: str) -> str:
        # A Redis URL may carry credentials; printing config must never show them.
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:{REDACTED}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))


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
