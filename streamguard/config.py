"""Configuration: defaults < TOML file < ``STREAMGUARD_*`` environment < explicit arguments.

Nested fields use ``__`` in the environment: ``STREAMGUARD_POLICY__AI_THRESHOLD=0.9``. The TOML file is the
one named by ``--config`` or ``STREAMGUARD_CONFIG``; without either, none is read.
"""

from __future__ import annotations

import ipaddress
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
    decode_threads: int = Field(
        0, ge=0, description="Threads that decode and prepare a batch's images, per process: Pillow decodes and "
        "resizes outside the GIL, so one image's pixels overlap another's Python work. 0: one per CPU this process "
        "may use (at most 4); 1: none, in the caller's thread. Each thread briefly holds one image at full decoded "
        "size on top of batch_pixel_budget.",
    )


class PluginSettings(_Section):
    allow: list[str] | None = Field(
        None, description="If set, only these plugins load (entry-point or built-in names)."
    )
    deny: list[str] = Field(default_factory=list, description="Plugins never loaded.")
    enable: list[str] = Field(default_factory=list,
                              description="Built-in plugins that are off by default to load too (builtin-mpft, "
                              "builtin-pinclip, builtin-nirnet).")
    trace_hooks: bool = Field(False, description="Log every hook call and its result.")


class DetectorSettings(_Section):
    timeout_s: float | None = Field(
        30.0, gt=0, description="Per call of one detector on up to batch_size images, in the worker (a batch "
        "of more images is several calls, one after another); None waits as long as the model takes. scan, "
        "eval and calibrate wait unless given --detector-timeout: offline, a slow model is no reason to lose "
        "the image.",
    )
    batch_size: int = Field(16, gt=0, description="Images per call of a detector.")
    breaker_failures: int = Field(5, gt=0, description="Consecutive failures that open the breaker.")
    breaker_reset_s: float = Field(30.0, gt=0, description="How long an open breaker refuses calls.")
    device: str = Field("cpu", description="torch device of the in-process backend.")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-detector options, keyed by detector name. The built-in CLIP "
        "detectors take weights_dir and views (resize, the default; cropsN or cropsN+whole: native crops whose "
        "logits are averaged, not what the default fusion was chosen on; -inset after any of them: the views are "
        "cut from the photo a screenshot shows; -jpeg last: what is shown is judged as a q75 JPEG)."
    )
    backend: Backend = Field(
        "inprocess", description="Where detectors run: in this process (torch) or on a Triton server (see [triton])."
    )
    backend_overrides: dict[str, Backend] = Field(
        default_factory=dict, description="Per-detector exceptions to `backend`, keyed by detector name."
    )
    shared_trunk: bool = Field(
        True, description="In-process detectors that branch off the same backbone (the built-in CLIP ones) "
        "share its frozen blocks: they run once per batch for all of them. false: each runs its whole model.",
    )

    def backend_for(self, detector: str) -> Backend:
        return self.backend_overrides.get(detector, self.backend)


def _empty_is_none(value: Any) -> Any:
    # An environment variable cannot say null, and charts template unset values as "".
    return None if isinstance(value, str) and not value.strip() else value


def _check_file(section: str, name: str, path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{section}.{name}: no such file: {path}")


def _grpc_target(url: str) -> str:
    """A comma-separated list of IP:port becomes gRPC's ``ipv4:a:p,b:p`` (or ``ipv6:[a]:p,...``) target: one
    channel over every address, balanced round robin. Anything else (host:port, dns:///name:port, ipv4:...)
    is already a target."""
    scheme = url.split(":", 1)[0]
    if scheme in ("ipv4", "ipv6", "unix", "unix-abstract") or (":/" in url and scheme != "dns"):
        return url
    if "," not in url:
        # gRPC would quietly take port 443 for a name without one (dns:///triton): Triton serves on 8001.
        host, _, port = url.rpartition("/")[2].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"triton.url {url!r} needs a port: host:port or dns:///name:port")
        return url
    families = set()
    for address in url.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            families.add(None)
        if not port.isdigit() or not host:
            families.add(None)
    if families == {4}:
        return f"ipv4:{url}"
    if families == {6}:
        return f"ipv6:{url}"
    raise ValueError(f"triton.url {url!r}: a list must be IP:port addresses of one family (10.0.0.5:8001,"
                     "10.0.0.6:8001 or [fd00::5]:8001,[fd00::6]:8001); for names use dns:///name:port, which "
                     "spreads over every address the name resolves to")


class TritonSettings(_Section):
    """The Triton backend: how the worker talks to the model server (gRPC, asyncio)."""

    url: str = Field(
        "127.0.0.1:8001", description="Triton's gRPC target. host:port; dns:///name:port to spread requests over "
        "every address the name resolves to (a headless Service: one address per Triton pod); or a list of "
        "addresses, 10.0.0.5:8001,10.0.0.6:8001 (gRPC's ipv4:/ipv6: targets are accepted as they are). Requests "
        "go round robin over all the addresses that answer.")
    ssl: bool = Field(False, description="Talk to Triton over TLS (Triton's --grpc-use-ssl).")
    root_certificates: Path | None = Field(
        None, description="PEM file of the CA(s) that signed Triton's certificate; unset: the system's roots.")
    private_key: Path | None = Field(None, description="PEM private key of this client, for mutual TLS.")
    certificate_chain: Path | None = Field(
        None, description="PEM certificate chain of this client, for mutual TLS (with private_key).")
    models: dict[str, str] = Field(
        default_factory=dict, description="Triton model name per detector, where it differs from the detector's own."
    )
    trunk_model: str | None = Field(
        None, description="The shared-trunk ensemble (`streamguard triton build --shared-trunk` writes "
        "clip-detectors): the detectors on Triton that branch off the CLIP trunk are then judged by one request "
        "per batch to it, the trunk running once for all of them, instead of one request per detector's model. "
        "Unset: each detector's own model.",
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

    @field_validator("root_certificates", "private_key", "certificate_chain", "trunk_model", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return _empty_is_none(value)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        url = ",".join(part.strip() for part in url.split(","))  # "a:1, b:1" as written in a values file
        if not url or any(ch.isspace() for ch in url):
            raise ValueError(f"triton.url {url!r} is not a gRPC target")
        _grpc_target(url)  # raises on a list it cannot express
        return url

    @model_validator(mode="after")
    def _check_backoff(self) -> TritonSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> TritonSettings:
        files = {"root_certificates": self.root_certificates, "private_key": self.private_key,
                 "certificate_chain": self.certificate_chain}
        for name, path in files.items():
            if path is not None:
                _check_file("triton", name, path)
                if not self.ssl:
                    raise ValueError(f"triton.{name} is set but triton.ssl is false: the connection would not use "
                                     "TLS; set triton.ssl = true")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("triton.private_key and triton.certificate_chain go together (mutual TLS): set both")
        return self

    def grpc_target(self) -> str:
        """`url` as gRPC spells it: a list of addresses becomes an ``ipv4:``/``ipv6:`` target."""
        return _grpc_target(self.url)


# Chosen by leave-one-source-out validation (`streamguard train loso ... --unseen-scores NAME=...`, see
# docs/validation.md, steps 11-28, 38 and 49), never on the test split, on all 26 groups of wild-train and
# wild-more (1,376 held-out images, 11 real sources): univfd trained on three augmentation draws, 150 procedural
# screenshots and 150 real photos shown as feed posts in its real class per group left out, its 24 candidate
# probes averaged since step 49 (univfd-1+4033efcc40; C and blocks chosen on groups before), pin-clip as
# plain LoRA (`--mode none`, tuned on LOSO: its learned noise cost 0.035 of its own AUC on groups left out)
# retrained with wild-more on 4 packed folds (they hold out 3-10 groups each, so its share is if anything
# understated). Weight search in steps of 0.1: univfd 0.9 / pin-clip 0.1
# 0.937, univfd alone 0.923, equal weights 0.917; +0.006 [+0.000, +0.014] over the same fusion without the
# feed posts, paired (step 28); chosen again on step 38's pool (the served view, folds rebuilt): the same
# weights, 0.921 against univfd alone 0.902 and equal weights 0.908; and on step 49's (the averaged probe): the
# same again, 0.931 against univfd alone 0.921 and equal weights 0.911. mpft adds nothing beside univfd
# (wild-more's groups: univfd alone 0.847, equal weights 0.820, step 11). The CLIP detectors' weights average
# 1, `default_weight`, so a detector without an entry counts as an average one. mpft is off by default
# (plugins.enable, plugins.py); enabled, its 0 keeps it out of the fusion while it reports.
VALIDATED_WEIGHTS: dict[str, float] = {
    "univfd": 1.8, "pin-clip": 0.2, "mpft": 0.0,
    # Not from the validation (no data set holds trusted content credentials): a trusted C2PA manifest is
    # the signer's own word on these exact bytes, so it outweighs the CLIP detectors together (2.0).
    # It abstains on every image without one, so it changes nothing the validation measured. The sizing,
    # with the detector's logits, is in streamguard/builtin/credentials/plugin.py.
    "credentials": 6.0,
}
# The fused logit recalibrated, and the policy chosen, on the pooled scores of the view the detectors serve
# (`resize-inset`, every held-out image; step 49's folds, univfd's probes averaged: fused 0.931 there, 0.935 on
# the resized view; step 38's, univfd's probe chosen on groups: 0.566025 / 0.082891, fused 0.921). The folds'
# own calibrations, fitted on sources they had seen, were ~1.7x overconfident on sources they had not (scale
# 0.58). Should pin-clip fail on an image, the verdict is univfd's alone under this calibration. Until step 38
# these were chosen on the resized view's scores of step 28's folds (0.639, 0.141; 0.93 / 0.41), which on the
# rebuilt folds under the served view flag one of ten app screenshots (a film's VFX frame the view cuts from a
# video app's screen).
VALIDATED_FUSED_SCALE = 0.581692
VALIDATED_FUSED_BIAS = 0.138682
# On that recalibrated probability, chosen to hold on the held-out images' JPEG q75 and 0.5x downscaled copies
# too (`train loso --policy-copies jpeg75,downscale0.5`, steps 42 and 49): at 0.95 no held-out real source has
# more than 2% of its photos flagged on any copy (ImageNet 2 of 262 the worst, 1 on the original bytes); 0.94,
# chosen on the original bytes alone (step 38), flagged one of 15 press portraits once downscaled. Generators
# have 10.0% of their images cleared at 0.36, on average, on the original bytes (the copy that clears most;
# step 42's 0.33 before the averaged probe). Between the two (39% of the pool; 32% of wild-more's) is
# `uncertain`: see docs/validation.md.
VALIDATED_AI_THRESHOLD = 0.95
VALIDATED_REAL_THRESHOLD = 0.36


class FusionSettings(_Section):
    weights: dict[str, float] = Field(
        default_factory=lambda: dict(VALIDATED_WEIGHTS),
        description="Weight per detector name, merged over the validated defaults; 0 leaves a detector out.")
    default_weight: float = Field(1.0, ge=0, description="Weight of a detector the table does not name.")
    scale: float = Field(VALIDATED_FUSED_SCALE, gt=0, description="The fused logit's calibration: "
                         "probability = sigmoid(scale * weighted mean + bias), fitted on held-out sources.")
    bias: float = Field(VALIDATED_FUSED_BIAS, description="See scale.")

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


class CredentialsSettings(_Section):
    """Content credentials (C2PA), read by the built-in `credentials` detector (docs/credentials.md)."""

    trust_anchors: Path | None = Field(
        None, description="PEM file of the root certificates whose signed manifests count as evidence (the C2PA "
        "trust list, a vendor's roots); they replace the library's own. Unset: the credentials detector is off.")

    @field_validator("trust_anchors", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return _empty_is_none(value)

    @field_validator("trust_anchors")
    @classmethod
    def _holds_certificates(cls, path: Path | None) -> Path | None:
        # Checked at start-up: a wrong file would otherwise only show as every credential being untrusted.
        if path is not None:
            _check_file("credentials", "trust_anchors", path)
            if b"-----BEGIN CERTIFICATE-----" not in path.read_bytes():
                raise ValueError(f"credentials.trust_anchors: no PEM certificate in {path}")
        return path


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


class FileTokenProvider:
    """kafka-python's OAUTHBEARER token provider (``sasl_oauth_token_provider``) that reads the token from a file
    at every authentication: Kubernetes projected service-account tokens and token-refreshing sidecars replace
    the file before the old token expires, and each new broker connection then presents the current one.

    Registered as a virtual subclass of kafka-python's ``AbstractTokenProvider`` on first use (the Kafka client
    checks ``isinstance``), so importing the configuration does not import kafka-python. The token is never
    logged and never part of the repr."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _register_token_provider()

    def token(self) -> str:
        try:
            token = self.path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise OSError(f"kafka OAUTHBEARER token file {self.path}: {exc.strerror or exc}") from None
        if not token:
            raise ValueError(f"kafka OAUTHBEARER token file {self.path} is empty")
        return token

    def extensions(self) -> dict[str, str]:
        return {}

    def __repr__(self) -> str:
        return f"FileTokenProvider({str(self.path)!r})"


def _register_token_provider() -> None:
    try:
        from kafka.net.sasl.oauth import AbstractTokenProvider  # kafka-python 3.x
    except ImportError:  # pragma: no cover - kafka-python 2.x spelling
        from kafka.sasl.oauth import AbstractTokenProvider  # type: ignore[import-not-found,no-redef]
    if not issubclass(FileTokenProvider, AbstractTokenProvider):
        AbstractTokenProvider.register(FileTokenProvider)


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    client_id: str = Field("streamguard", description="Sent with every request: broker logs, quotas and ACLs see it.")
    # TLS (security_protocol SSL or SASL_SSL). Files are read when a client connects.
    ssl_cafile: Path | None = Field(
        None, description="PEM file of the CA(s) that signed the brokers' certificates; unset: the system's roots.")
    ssl_certfile: Path | None = Field(
        None, description="PEM client certificate, for mutual TLS (may hold the key too).")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile, when kept apart.")
    ssl_password: SecretStr | None = Field(None, description="Password of an encrypted ssl_keyfile.")
    ssl_check_hostname: bool = Field(
        True, description="Check that a broker's certificate names the host connected to.")
    # SASL (security_protocol SASL_PLAINTEXT or SASL_SSL).
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = Field(None, description="PLAIN and SCRAM.")
    sasl_password: SecretStr | None = Field(None, description="PLAIN and SCRAM.")
    sasl_oauth_token_file: Path | None = Field(
        None, description="OAUTHBEARER: a file holding the bearer token, read again at every authentication, so a "
        "token Kubernetes projects and rotates (or a sidecar refreshes) is always the current one.")
    # Off by default: the worker's bytes are mostly dead-letter images, already compressed (JPEG, PNG,
    # WebP), and small verdicts; a codec would cost CPU the detectors want, and would oblige every reader of
    # the verdicts to have the codec library (a missing one kills a kafka-python consumer). Records read
    # are decoded whatever this says: every codec's library is installed.
    compression_type: Literal[None, "gzip", "snappy", "lz4", "zstd"] = Field(
        None, description="Codec of what the worker (and `streamguard produce`) publishes; none, as Kafka "
        "spells it, means off.")

    # kafka-python 3.0.12's default (16 KiB, as Java's) holds about 14 verdicts of ~1.1 KB: a batch fills
    # before linger_ms runs out and goes at once, in a produce request of its own that the broker
    # acknowledges (acks=all) on its own. At 256 KiB a partition's verdicts go out once per linger_ms
    # instead. bench_worker, one process, same rounds: 1.22x the events/s, 15% less CPU per event (README,
    # "Throughput"). kafka-python's batch builders grow as they fill: a large limit reserves no memory.
    producer_batch_bytes: int = Field(
        262_144, gt=0, description="Largest batch of records a producer sends to one partition at once "
        "(kafka-python's batch_size); a batch also goes out when linger_ms has passed.")

    # kafka-python waits 30 s for a first broker; a worker that cannot reach any should say so sooner and
    # let its supervisor restart it.
    bootstrap_timeout_s: float = Field(
        10.0, gt=0, description="How long a client waits to reach a first broker before failing.")

    @field_validator("compression_type", mode="before")
    @classmethod
    def _none_spelled_out(cls, value: Any) -> Any:
        # Kafka and librdkafka spell "off" as "none"; an environment variable cannot say null.
        return None if isinstance(value, str) and value.strip().lower() in ("none", "") else value

    @field_validator("sasl_mechanism", mode="before")
    @classmethod
    def _mechanism(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().upper()  # kafka-python knows only the upper-case names
            return None if value in ("", "NONE") else value
        return value

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "sasl_username", "sasl_password",
                     "sasl_oauth_token_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return _empty_is_none(value)

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        sasl = self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None:
                _check_file("kafka", name, path)
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password"):
            if getattr(self, name) is not None and not tls:
                raise ValueError(f"kafka.{name} is set but kafka.security_protocol is {self.security_protocol}: "
                                 "the connection would not use TLS; use SSL or SASL_SSL")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("kafka.ssl_keyfile needs kafka.ssl_certfile, the certificate it belongs to")
        if self.ssl_password is not None and self.ssl_certfile is None:
            raise ValueError("kafka.ssl_password decrypts the client key, but kafka.ssl_certfile is not set")

        mechanism = self.sasl_mechanism
        if sasl and mechanism is None:
            raise ValueError(f"kafka.security_protocol {self.security_protocol} needs kafka.sasl_mechanism "
                             "(PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)")
        if mechanism is not None and not sasl:
            raise ValueError(f"kafka.sasl_mechanism {mechanism} is set but kafka.security_protocol is "
                             f"{self.security_protocol}: use SASL_SSL (or SASL_PLAINTEXT)")
        if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            missing = [f"kafka.{name}" for name in ("sasl_username", "sasl_password") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"kafka.sasl_mechanism {mechanism} needs {' and '.join(missing)}")
            if self.sasl_oauth_token_file is not None:
                raise ValueError(f"kafka.sasl_oauth_token_file is for OAUTHBEARER, not {mechanism}")
        if mechanism == "OAUTHBEARER":
            if self.sasl_oauth_token_file is None:
                raise ValueError("kafka.sasl_mechanism OAUTHBEARER needs kafka.sasl_oauth_token_file")
            _check_file("kafka", "sasl_oauth_token_file", self.sasl_oauth_token_file)
            if self.sasl_username is not None or self.sasl_password is not None:
                raise ValueError("kafka.sasl_username and kafka.sasl_password are not used by OAUTHBEARER, which "
                                 "reads its token from kafka.sasl_oauth_token_file; unset them")
        if mechanism is None and self.sasl_oauth_token_file is not None:
            raise ValueError("kafka.sasl_oauth_token_file is set but kafka.sasl_mechanism is not OAUTHBEARER")
        return self

    def client_config(self) -> dict[str, Any]:
        """Connection settings shared by every kafka-python client (consumer, producer, admin)."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
            "bootstrap_timeout_ms": int(self.bootstrap_timeout_s * 1000),
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            config |= {
                "ssl_check_hostname": self.ssl_check_hostname,
                "ssl_cafile": _str_or_none(self.ssl_cafile),
                "ssl_certfile": _str_or_none(self.ssl_certfile),
                "ssl_keyfile": _str_or_none(self.ssl_keyfile),
                "ssl_password": self.ssl_password.get_secret_value() if self.ssl_password else None,
            }
        if self.sasl_mechanism == "OAUTHBEARER":
            assert self.sasl_oauth_token_file is not None  # checked by _check_security
            config |= {"sasl_mechanism": "OAUTHBEARER",
                       "sasl_oauth_token_provider": FileTokenProvider(self.sasl_oauth_token_file)}
        elif self.sasl_mechanism:
            config |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            }
        return config


class RedisSettings(_Section):
    url: str = Field("redis://127.0.0.1:6379/0", description="redis://, or rediss:// for TLS.")
    socket_timeout_s: float = Field(0.5, gt=0, description="Per Redis command; dedupe must never stall the stream.")
    retry_interval_s: float = Field(1.0, gt=0, description="While Redis is down, how often to try it again.")
    ssl_ca_certs: Path | None = Field(
        None, description="rediss://: PEM file of the CA(s) that signed Redis's certificate; unset: the system's "
        "roots.")
    ssl_certfile: Path | None = Field(None, description="rediss://: PEM client certificate, for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="rediss://: PEM private key of ssl_certfile.")

    @field_validator("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return _empty_is_none(value)

    @model_validator(mode="after")
    def _check_tls(self) -> RedisSettings:
        scheme = urlsplit(self.url).scheme.lower()
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is None:
                continue
            _check_file("redis", name, path)
            if scheme != "rediss":
                # The scheme only, never the URL: it may carry a password.
                raise ValueError(f"redis.{name} is set but redis.url is {scheme}://, not rediss://: the connection "
                                 "would not use TLS")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("redis.ssl_keyfile needs redis.ssl_certfile, the certificate it belongs to")
        return self

    def tls_options(self) -> dict[str, str]:
        """redis-py's TLS keyword arguments for ``Redis.from_url`` (only those set)."""
        options = {"ssl_ca_certs": self.ssl_ca_certs, "ssl_certfile": self.ssl_certfile,
                   "ssl_keyfile": self.ssl_keyfile}
        return {name: str(path) for name, path in options.items() if path is not None}

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
    share_across_tenants: bool = Field(
        False, description="Tenants answer each other's copies from one cache (re-decided under the asking "
        "tenant's policy, without the other tenant's event ids). false: each tenant has its own cache; "
        "tenants.<name>.share_dedupe overrides it per tenant.",
    )


class TenantSettings(_Section):
    """One tenant's overrides; whatever is unset falls back to the global setting."""

    ai_threshold: float | None = Field(None, ge=0, le=1, description="Default: policy.ai_threshold.")
    real_threshold: float | None = Field(None, ge=0, le=1, description="Default: policy.real_threshold.")
    fusion_weights: dict[str, float] = Field(
        default_factory=dict, description="Merged over fusion.weights for this tenant's verdicts.")
    banks: list[str] | None = Field(
        None, description="Hash banks matched before any detector runs, in order. Default: every bank of "
        "banks.definitions, then review.bank_ai and review.bank_real (what this deployment's reviewers decided).")
    share_dedupe: bool | None = Field(None, description="Default: dedupe.share_across_tenants.")


class ReviewSettings(_Section):
    """Human review: which verdicts also go to a review queue, and where decisions come back."""

    topic: str | None = Field(None, description="Review requests go here; unset: nothing is routed to review.")
    labels: list[Literal["ai_generated", "real", "uncertain"]] = Field(
        default_factory=lambda: ["uncertain"], description="Verdict labels routed to review.")
    degraded: bool = Field(False, description="Also route degraded verdicts (some detector failed).")
    decisions_topic: str = Field("review.decisions", description="Where reviewers' decisions come back.")
    group_id: str = Field("streamguard-review", description="Consumer group of `streamguard review apply`.")
    batch_size: int = Field(100, gt=0, description="Decisions applied, published and committed together.")
    bank_ai: str = Field("review-ai", description="Bank that content decided ai_generated is added to.")
    bank_real: str = Field("review-real", description="Bank that content decided real is added to.")


class BanksSettings(_Section):
    """Hash banks: known AI-generated and known-real content, matched exactly (SHA-256) and nearly (PDQ)
    before any detector runs (`streamguard.banks`)."""

    definitions: dict[str, Literal["ai_generated", "real"]] = Field(
        default_factory=dict, description="Bank name -> the label its content gets. None defined: no bank "
        "matching. A bank written to Redis keeps the label it was created with; a conflict is refused.")
    redis_url: str | None = Field(None, description="Default: redis.url (TLS files and timeouts come from "
                                  "[redis] either way).")
    key_prefix: str = Field("sg:banks", min_length=1, description="Prefix of every bank key in Redis.")
    near_max_distance: int | None = Field(
        None, ge=0, le=64, description="PDQ distance of a near match. Default: dedupe.near_max_distance.")
    near_min_quality: int | None = Field(
        None, ge=0, le=100, description="PDQ hashes of lower quality are neither matched nor banked for near "
        "matching. Default: dedupe.near_min_quality.")
    refresh_interval_s: float = Field(
        5.0, ge=0, description="How often a worker loads bank additions into its near-match index (exact "
        "matches read Redis and see them at once); 0: only at start.")

    @field_serializer("redis_url")
    def _redact_password(self, url: str | None) -> str | None:
        return None if url is None else RedisSettings.model_construct(url=url).model_dump(mode="json")["url"]


class WorkerSettings(_Section):
    group_id: str = "streamguard"
    input_topic: str = "images"
    output_topic: str = "verdicts"
    dead_letter_topic: str = "images.dlq"
    max_in_flight: int = Field(256, gt=0, description="Records polled but not yet committed, in total.")
    max_in_flight_per_partition: int = Field(64, gt=0)
    # 32, not 16: what a batch costs whatever its size (the hand-off to each detector's thread and back, stage
    # metrics, batch assembly) is paid half as often. bench_worker with a trivial detector, one process: 1.12x
    # the events/s of 16 in the same rounds (README, "Throughput"). A detector still gets at most
    # detectors.batch_size images a call, each call with its own timeout.
    batch_size: int = Field(32, gt=0, description="Records scored together (at most; a batch does not wait "
                            "longer than batch_wait_ms to fill).")
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
    processes: int = Field(
        1, ge=1, le=64, description="Worker processes in this pod, each a full consumer of the same group "
        "(`worker --processes N`); more than the input's partitions leaves some idle. Above 1 a supervisor "
        "starts them, restarts one that dies (with backoff) and serves the pod's health on health_port.",
    )


class ServeKey(_Section):
    """One API key of `streamguard serve`, stored as the SHA-256 of the key, never the key itself."""

    name: str = Field(min_length=1, max_length=128, description="Names the key in logs and rate limits.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the key (`printf %s KEY | "
                        "sha256sum`).")
    tenant: str | None = Field(None, max_length=256, description="If set, the key may only check for this tenant "
                               "(a request naming none gets it).")
    rate_per_s: float | None = Field(None, gt=0, description="This key's sustained requests per second; unset: "
                                     "serve.rate_per_s.")
    burst: int | None = Field(None, gt=0, description="This key's burst; unset: serve.burst.")


class ServeSettings(_Section):
    """`streamguard serve`: the synchronous check over HTTP (POST /v1/check), same pipeline as the worker."""

    host: str = Field("0.0.0.0", description="Address the check API listens on.")
    port: int = Field(8000, ge=0, description="0 picks a free port. /healthz, /readyz and /metrics stay on "
                      "worker.health_host:worker.health_port, away from the API's threads.")
    auth: bool = Field(True, description="Require an API key (Authorization: Bearer KEY or X-API-Key). false only "
                       "for local use: then rate limits apply per client address.")
    api_keys: list[ServeKey] = Field(default_factory=list, description="Keys, hashed.")
    api_keys_file: Path | None = Field(
        None, description="A secret file of keys, one `NAME KEY [TENANT]` a line (KEY may be sha256:HEX), read "
        "again when it changes (a rotated Kubernetes Secret).")
    rate_per_s: float = Field(20.0, gt=0, description="Sustained requests per second per key (token bucket).")
    burst: int = Field(40, gt=0, description="Requests a key may make at once before rate_per_s applies.")
    # auto, not redis: redis.url always has a default, so only dedupe being on says a Redis is really there;
    # without one, redis would limit locally anyway, after warning about it.
    rate_limit_store: Literal["auto", "redis", "local"] = Field(
        "auto", description="Where the rate limits' buckets live. redis: in [redis] (keys under dedupe.namespace), "
        "so all replicas share one budget per key; while Redis cannot answer, each replica limits locally. local: "
        "in this process, so N replicas allow a key N times its rate. auto: redis when dedupe is enabled, else "
        "local.")
    max_body_bytes: int | None = Field(
        None, gt=0, description="Largest raw image body; larger is refused from its Content-Length, before the "
        "body is read. Unset: intake.max_bytes.")
    max_json_bytes: int = Field(64 * 1024, gt=0, description="Largest JSON body.")
    threads: int = Field(32, gt=0, description="Connections served at once (each waits for its verdict).")
    max_connections: int = Field(
        256, gt=0, description="Connections open or waiting for a thread; over it a new one gets 503 at once.")
    max_queue: int = Field(256, gt=0, description="Checks waiting for the scorer; over it: 503 with Retry-After.")
    batch_size: int = Field(16, gt=0, description="Concurrent checks judged together in one pipeline call.")
    batch_wait_ms: int = Field(5, ge=0, description="How long the first check of a batch waits for company.")
    read_timeout_s: float = Field(10.0, gt=0, description="Silence allowed while a request is read.")
    body_timeout_s: float = Field(30.0, gt=0, description="Longest a request body may take to arrive.")
    request_timeout_s: float = Field(30.0, gt=0, description="Longest a check waits for its verdict: 504.")

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return _empty_is_none(value)


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
    precision: Literal["fp32", "int8", "int8-mixed"] = Field(
        "fp32",
        description="What the in-process detectors run the encoder's blocks at: fp32 (the reference), int8 "
        "(dynamic quantization of their linear layers; CPU only, faster) or int8-mixed (int8 with the MLP output "
        "layers, whose inputs carry activation outliers, left float; CPU only). Detector versions end in "
        "`.int8` / `.int8-mixed` at those. Training and `triton build` always use fp32.",
    )
    runtime: Literal["torch", "onnxruntime"] = Field(
        "torch",
        description="What runs the in-process shared trunk (the encoder blocks the CLIP detectors share): torch, "
        "or onnxruntime (a graph exported once per backbone and branch points into cache_dir, at `precision`, "
        "int8 by ONNX Runtime's own quantization; CPU only, detectors.shared_trunk only; the heads stay torch). "
        "Detector versions end in `.ort-fp32` / `.ort-int8` / `.ort-int8-mixed` with it.",
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
        # A validation error would otherwise quote the raw input, a Redis URL's password included.
        hide_input_in_errors=True,
        # Set per instance by `load_settings`; None means no file.
        toml_file=None,
    )

    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    plugins: PluginSettings = Field(default_factory=PluginSettings)
    detectors: DetectorSettings = Field(default_factory=DetectorSettings)
    fusion: FusionSettings = Field(default_factory=FusionSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    credentials: CredentialsSettings = Field(default_factory=CredentialsSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    tenants: dict[str, TenantSettings] = Field(
        default_factory=dict, description="Per-tenant settings by ImageEvent.tenant; other tenants get the globals.")
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    banks: BanksSettings = Field(default_factory=BanksSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
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

    @model_validator(mode="after")
    def _onnxruntime_runs_the_shared_trunk(self) -> Settings:
        uses_inprocess = (self.detectors.backend == "inprocess"
                          or "inprocess" in self.detectors.backend_overrides.values())
        if uses_inprocess and self.backbone.runtime == "onnxruntime" and not self.detectors.shared_trunk:
            # Else the detectors would load their whole torch models while their versions say ONNX Runtime.
            raise ValueError(
                'backbone.runtime = "onnxruntime" runs the shared trunk only (only the trunk is exported, not the '
                'detectors\' whole models): set detectors.shared_trunk = true or backbone.runtime = "torch"'
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
