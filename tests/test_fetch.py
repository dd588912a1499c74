"""ImageFetcher against real HTTP(S) servers on loopback.

The servers listen on 127.0.0.2 (Linux loopback answers on all of 127/8) so that the allow-list
``127.0.0.2/32`` can admit them while 127.0.0.1 stays blocked. No test reaches a non-loopback address:
addresses that must be refused are checked with ``socket.create_connection`` replaced by a spy that records
and raises, so even a bug could not connect to them.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from images import encode, noise
from streamguard.config import FetchSettings
from streamguard.errors import FetchFailed, FetchRefused, FetchTooLarge, TooManyRedirects
from streamguard.fetch import FetchedImage, ImageFetcher, blocked_reason, event_bytes
from streamguard.schemas import ImageEvent

HOST = "127.0.0.2"
ALLOW = [f"{HOST}/32"]
LIMIT = 64 * 1024
PNG = encode(noise((64, 48)), "PNG")
assert len(PNG) < LIMIT


def gzipped(chunks: Iterable[bytes]) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join([*map(compressor.compress, chunks), compressor.flush()])


def zeros(megabytes: int) -> Iterator[bytes]:
    block = bytes(1 << 20)
    return (block for _ in range(megabytes))


# 256 MiB of zeros gzipped twice: under a kilobyte on the wire (the incident's was 1.8 KB for 2.1 GB).
BOMB = gzipped([gzipped(zeros(256))])
BOMB_DECODED = 256 << 20
assert len(BOMB) < 1024


@dataclass
class Server:
    base: str
    port: int
    requests: list[dict[str, str]] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "fetch-test"
    stop: threading.Event
    record: list[dict[str, str]]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, headers={"Location": location})

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        self.record.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        path = self.path
        try:
            if path == "/img":
                self._send(200, PNG, {"Content-Type": "image/png"})
            elif path.startswith("/redirect/"):
                n = int(path.rsplit("/", 1)[1])
                if n > 0:
                    # A path-relative Location ("2" from /redirect/3), so relative resolution is exercised.
                    self._redirect(str(n - 1))
                else:
                    self._send(200, PNG, {"Content-Type": "image/png"})
            elif path == "/to-blocked":
                self._redirect(f"http://127.0.0.1:{self.server.server_address[1]}/img")
            elif path == "/to-file":
                self._redirect("file:///etc/passwd")
            elif path == "/big":
                # HTTP/1.0 without Content-Length: the body ends when the connection closes.
                self.send_response(200)
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"\0" * 16 * 1024)
            elif path == "/biglen":
                self.send_response(200)
                self.send_header("Content-Length", str(10 * LIMIT))
                self.end_headers()
                self.wfile.write(b"\0" * 1024)
                self.stop.wait(5)
            elif path == "/gzip-bomb":
                # Sent although the fetcher asks for identity.
                self._send(200, BOMB, {"Content-Type": "image/png", "Content-Encoding": "gzip, gzip"})
            elif path == "/gzip-big":
                self._send(200, gzipped(zeros(1)), {"Content-Encoding": "gzip"})
            elif path == "/gzip-img":
                self._send(200, gzipped([gzipped([PNG])]), {"Content-Type": "image/png",
                                                            "Content-Encoding": "gzip, x-gzip"})
            elif path == "/deflate-img":
                self._send(200, zlib.compress(PNG), {"Content-Encoding": "deflate"})
            elif path == "/gzip-corrupt":
                self._send(200, gzipped([PNG])[:-40], {"Content-Encoding": "gzip"})
            elif path == "/br":
                self._send(200, PNG, {"Content-Encoding": "br"})
            elif path == "/slow":
                self.stop.wait(5)
                self._send(200, PNG)
            elif path == "/drip":
                # Each byte arrives well within any per-read timeout; only a whole-fetch deadline stops it.
                self.send_response(200)
                self.end_headers()
                for _ in range(50):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    if self.stop.wait(0.1):
                        break
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client hung up on purpose (limits); nothing to answer


@contextlib.contextmanager
def serve(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    stop = threading.Event()
    record: list[dict[str, str]] = []
    handler = type("Handler", (_Handler,), {"stop": stop, "record": record})
    httpd = http.server.ThreadingHTTPServer((HOST, 0), handler)
    httpd.daemon_threads = True
    port = httpd.server_address[1]
    server = Server(base=f"{'https' if tls else 'http'}://{HOST}:{port}", port=port, requests=record)
    if tls is not None:

        def note_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            server.sni.append(name)

        tls.sni_callback = note_sni  # type: ignore[assignment]
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()  # wakes handlers that sleep (/slow, /biglen, /drip)
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serve() as srv:
        yield srv


def settings(**overrides: Any) -> FetchSettings:
    values: dict[str, Any] = {"allow_networks": ALLOW, "timeout_s": 1.0, "connect_timeout_s": 0.5}
    return FetchSettings(**(values | overrides))


@pytest.fixture
def fetcher() -> Iterator[ImageFetcher]:
    with ImageFetcher(settings(), LIMIT) as f:
        yield f


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Replaces socket.create_connection with a spy that records the attempt and never connects."""
    attempts: list[tuple[Any, ...]] = []

    def spy(address: tuple[Any, ...], *args: Any, **kwargs: Any) -> socket.socket:
        attempts.append(address)
        raise AssertionError(f"connection attempted to {address}")

    monkeypatch.setattr(socket, "create_connection", spy)
    return attempts


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Records every address connected to; refuses (by raising) anything off 127.0.0.2."""
    real = socket.create_connection
    seen: list[tuple[Any, ...]] = []

    def spy(address: tuple[Any, ...], *args: Any, **kwargs: Any) -> socket.socket:
        seen.append(address)
        assert address[0] == HOST, f"connection attempted to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return seen


Answer = Callable[[int], list[str]]


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Answer | list[str] | None], list[str]]:
    """Makes chosen hostnames resolve to chosen addresses (the nth lookup gets ``answer(n)``); None means
    the name does not resolve. Other names go to the real resolver. Returns the log of faked lookups."""
    real = socket.getaddrinfo
    answers: dict[str, Answer | None] = {}
    lookups: list[str] = []

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        answer = answers[host]
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        count = sum(1 for h in lookups if h == host)
        lookups.append(host)
        result = []
        for ip in answer(count):
            if ipaddress.ip_address(ip).version == 4:
                result.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)))
            else:
                result.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)))
        return result

    def add(host: str, answer: Answer | list[str] | None) -> list[str]:
        answers[host] = answer if answer is None or callable(answer) else (lambda _n, a=answer: a)
        return lookups

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return add


# --- success, pinning -------------------------------------------------------------------------------


def test_fetches_from_allow_listed_loopback(server: Server, fetcher: ImageFetcher) -> None:
    image = fetcher.fetch(f"{server.base}/img")
    assert isinstance(image, FetchedImage)
    assert image.data == PNG
    assert image.content_type == "image/png"
    assert image.final_uri == f"{server.base}/img"
    assert image.redirects == 0
    assert 0 < image.elapsed_ms < 1000
    request = server.requests[-1]
    assert request["user-agent"] == FetchSettings().user_agent
    assert request["accept-encoding"] == "identity"


def test_connects_to_the_vetted_address_keeping_the_hostname(
    server: Server, connections: list[tuple[Any, ...]], fake_dns: Any
) -> None:
    # A rebinding resolver: the first answer passes the check, every later one points at 127.0.0.1.
    lookups = fake_dns("images.example", lambda n: [HOST] if n == 0 else ["127.0.0.1"])
    with ImageFetcher(settings(), LIMIT) as fetcher:
        image = fetcher.fetch(f"http://images.example:{server.port}/img")
    assert image.data == PNG
    assert lookups == ["images.example"]  # resolved once; nothing resolves the name again to connect
    assert connections == [(HOST, server.port)]
    assert server.requests[-1]["host"] == f"images.example:{server.port}"


def test_falls_back_to_the_next_vetted_address(server: Server, fake_dns: Any) -> None:
    # Nothing listens on 127.0.0.3; the connection moves on to the host's second (also vetted) address.
    fake_dns("two.example", ["127.0.0.3", HOST])
    with ImageFetcher(settings(allow_networks=[*ALLOW, "127.0.0.3/32"]), LIMIT) as fetcher:
        assert fetcher.fetch(f"http://two.example:{server.port}/img").data == PNG


# --- refused before any connection --------------------------------------------------------------------


def test_loopback_refused_without_allow_list(server: Server, no_connect: list[Any]) -> None:
    with ImageFetcher(FetchSettings(), LIMIT) as fetcher, pytest.raises(FetchRefused, match="loopback"):
        fetcher.fetch(f"{server.base}/img")
    assert no_connect == []


@pytest.mark.parametrize(
    ("uri", "host", "reason"),
    [
        ("http://127.0.0.1:{port}/img", "127.0.0.1", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "cloud metadata"),
        ("http://10.0.0.1/", "10.0.0.1", "private"),
        ("http://[::1]/", "::1", "loopback"),
        ("http://0.0.0.0/", "0.0.0.0", "unspecified"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1", "loopback"),
        ("http://[::ffff:a9fe:a9fe]/", "::ffff:a9fe:a9fe", "cloud metadata"),
        ("http://224.0.0.1/", "224.0.0.1", "multicast"),
        ("http://100.64.0.1/", "100.64.0.1", "not globally routable .shared address space"),
        ("http://[fec0::1]/", "fec0::1", "site-local"),
        ("http://[fe80::1]/", "fe80::1", "link-local"),
    ],
)
def test_blocked_addresses_are_never_contacted(
    uri: str, host: str, reason: str, server: Server, fetcher: ImageFetcher, no_connect: list[Any]
) -> None:
    with capture_logs() as logs, pytest.raises(FetchRefused, match=reason) as caught:
        fetcher.fetch(uri.format(port=server.port))
    assert f"host {host!r}" in str(caught.value)
    assert no_connect == []
    assert [(entry["event"], entry["host"]) for entry in logs] == [("fetch.refused", host)]


def test_hostname_resolving_to_loopback_refused(fetcher: ImageFetcher, no_connect: list[Any]) -> None:
    with pytest.raises(FetchRefused, match="'localhost'.*loopback"):
        fetcher.fetch("http://localhost/img")
    assert no_connect == []


def test_one_blocked_address_refuses_the_host(
    server: Server, fetcher: ImageFetcher, fake_dns: Any, no_connect: list[Any]
) -> None:
    fake_dns("mixed.example", [HOST, "10.0.0.1"])
    with pytest.raises(FetchRefused, match="10.0.0.1, private"):
        fetcher.fetch(f"http://mixed.example:{server.port}/img")
    assert no_connect == []


@pytest.mark.parametrize("uri", ["ftp://example.com/a.png", "file:///etc/passwd", "not a uri", "http:///img"])
def test_non_http_or_hostless_uris_refused(uri: str, fetcher: ImageFetcher, no_connect: list[Any]) -> None:
    with pytest.raises(FetchRefused):
        fetcher.fetch(uri)
    assert no_connect == []


# --- redirects --------------------------------------------------------------------------------------


def test_follows_relative_redirects_up_to_the_limit(server: Server, fetcher: ImageFetcher) -> None:
    image = fetcher.fetch(f"{server.base}/redirect/3")
    assert image.data == PNG
    assert image.redirects == 3
    assert image.final_uri == f"{server.base}/redirect/0"


def test_redirect_limit(server: Server, fetcher: ImageFetcher) -> None:
    with pytest.raises(TooManyRedirects, match="limit 3"):
        fetcher.fetch(f"{server.base}/redirect/4")
    with ImageFetcher(settings(max_redirects=0), LIMIT) as strict, pytest.raises(TooManyRedirects):
        strict.fetch(f"{server.base}/redirect/1")


def test_redirect_into_blocked_address_refused(
    server: Server, fetcher: ImageFetcher, connections: list[tuple[Any, ...]]
) -> None:
    with pytest.raises(FetchRefused, match="'127.0.0.1'.*loopback"):
        fetcher.fetch(f"{server.base}/to-blocked")
    assert connections == [(HOST, server.port)]  # the first hop only


def test_redirect_to_other_scheme_refused(server: Server, fetcher: ImageFetcher) -> None:
    with pytest.raises(FetchRefused, match="'file'"):
        fetcher.fetch(f"{server.base}/to-file")


# --- limits -----------------------------------------------------------------------------------------


def test_streamed_body_over_limit(server: Server, fetcher: ImageFetcher) -> None:
    with pytest.raises(FetchTooLarge, match=f"more than the limit of {LIMIT}"):
        fetcher.fetch(f"{server.base}/big")


def test_declared_length_over_limit_refused_up_front(server: Server, fetcher: ImageFetcher) -> None:
    start = time.monotonic()
    with pytest.raises(FetchTooLarge, match=f"declared {10 * LIMIT} bytes"):
        fetcher.fetch(f"{server.base}/biglen")
    assert time.monotonic() - start < 0.5  # did not wait for the body


def test_settings_max_bytes_overrides_the_intake_limit(server: Server) -> None:
    with ImageFetcher(settings(max_bytes=100), LIMIT) as fetcher, pytest.raises(FetchTooLarge):
        fetcher.fetch(f"{server.base}/img")


def test_encoded_bomb_never_inflates(server: Server, fetcher: ImageFetcher) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(FetchTooLarge, match=f"gzip body of more than the limit of {LIMIT}"):
            fetcher.fetch(f"{server.base}/gzip-bomb")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Without the cap on decoded bytes, httpx allocates the whole 256 MiB before any limit looks.
    assert peak < 16 * LIMIT < BOMB_DECODED


def test_decoded_size_is_capped_at_the_last_layer_too(server: Server, fetcher: ImageFetcher) -> None:
    with pytest.raises(FetchTooLarge, match="once decoded"):
        fetcher.fetch(f"{server.base}/gzip-big")


@pytest.mark.parametrize("path", ["/gzip-img", "/deflate-img"])
def test_encoded_image_is_decoded(path: str, server: Server, fetcher: ImageFetcher) -> None:
    assert fetcher.fetch(f"{server.base}{path}").data == PNG


@pytest.mark.parametrize(("path", "error"), [("/gzip-corrupt", "corrupt gzip body"),
                                             ("/br", "unsupported Content-Encoding 'br'")])
def test_undecodable_bodies_fail(path: str, error: str, server: Server, fetcher: ImageFetcher) -> None:
    with pytest.raises(FetchFailed, match=error):
        fetcher.fetch(f"{server.base}{path}")


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_whole_fetch_deadline(path: str, server: Server, fetcher: ImageFetcher) -> None:
    # /drip sends a byte every 0.1 s: no single read times out, only the 1 s deadline for the fetch does.
    start = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):
        fetcher.fetch(f"{server.base}{path}")
    assert 0.9 < time.monotonic() - start < 1.5


def test_http_error_status(server: Server, fetcher: ImageFetcher) -> None:
    with pytest.raises(FetchFailed, match=f"'{HOST}' answered HTTP 404"):
        fetcher.fetch(f"{server.base}/404")


def test_nothing_listening(fetcher: ImageFetcher) -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchFailed, match="could not connect"):
        fetcher.fetch(f"http://{HOST}:{port}/img")


def test_unresolvable_host(fetcher: ImageFetcher, fake_dns: Any, no_connect: list[Any]) -> None:
    fake_dns("nowhere.example", None)
    with pytest.raises(FetchFailed, match="could not resolve host 'nowhere.example'"):
        fetcher.fetch("http://nowhere.example/img")
    assert no_connect == []


# --- TLS on a pinned connection -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_server(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the fetcher's default TLS context trusts it
    with serve(context) as srv:
        yield srv


def test_https_keeps_sni_and_verifies_the_hostname(
    tls_server: Server, fake_dns: Any, connections: list[tuple[Any, ...]]
) -> None:
    fake_dns("images.test", [HOST])
    with ImageFetcher(settings(), LIMIT) as fetcher:
        image = fetcher.fetch(f"https://images.test:{tls_server.port}/img")
    assert image.data == PNG
    assert connections == [(HOST, tls_server.port)]
    assert tls_server.sni == ["images.test"]
    assert tls_server.requests[-1]["host"] == f"images.test:{tls_server.port}"


def test_https_certificate_for_another_name_fails(tls_server: Server, fake_dns: Any) -> None:
    fake_dns("other.test", [HOST])
    with ImageFetcher(settings(), LIMIT) as fetcher, pytest.raises(FetchFailed, match="other.test"):
        fetcher.fetch(f"https://other.test:{tls_server.port}/img")


# --- events and pure checks -------------------------------------------------------------------------


def test_event_bytes_inline_and_by_uri(server: Server, fetcher: ImageFetcher) -> None:
    inline = ImageEvent(event_id="a", image=b"inline-bytes")
    assert event_bytes(inline, fetcher) == b"inline-bytes"
    by_uri = ImageEvent(event_id="b", uri=f"{server.base}/img")  # type: ignore[arg-type]
    assert event_bytes(by_uri, fetcher) == PNG


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        # Public unicast: allowed.
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("192.0.0.9", None),  # PCP anycast: the globally reachable exceptions of 192.0.0.0/24
        ("192.0.0.10", None),  # TURN anycast
        ("2606:4700:4700::1111", None),
        ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
        ("2002:808:808::1", None),  # 6to4 of 8.8.8.8
        ("::ffff:8.8.8.8", None),  # IPv4-mapped: judged as the IPv4 inside
        # IPv4.
        ("0.1.2.3", "private|reserved|not globally"),
        ("10.0.0.1", "private"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "shared address space"),  # Python 3.11 calls it neither private nor reserved
        ("100.127.255.254", "shared address space"),
        ("192.0.0.1", "private"),
        ("192.0.0.8", "IETF protocol assignments"),  # Python 3.11 calls 192.0.0.8-255 global
        ("192.0.0.11", "IETF protocol assignments"),
        ("192.0.0.200", "IETF protocol assignments"),
        ("192.0.0.255", "IETF protocol assignments"),
        ("192.0.2.1", "private"),  # TEST-NET-1
        ("192.88.99.1", "6to4 relay anycast"),
        ("198.18.0.1", "private"),  # benchmarking
        ("198.51.100.7", "private"),
        ("203.0.113.7", "private"),
        ("224.0.0.1", "multicast"),
        ("233.252.0.1", "multicast"),
        ("240.0.0.1", "private|reserved|not globally"),
        ("255.255.255.255", "private|reserved|not globally"),
        # IPv6.
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fec0::1", "site-local"),  # Python 3.11 calls deprecated site-local global
        ("feff:ffff::1", "site-local"),
        ("fc00::1", "private"),
        ("fd00:ec2::254", "cloud metadata"),
        ("ff02::1", "multicast"),
        ("100::1", "private|reserved|not globally"),  # discard-only
        ("2001::1", "private"),  # Teredo
        ("2001:1::1", "private|IETF protocol assignments"),  # global on newer Pythons; refused here
        ("2001:db8::1", "private"),
        ("3fff::1", "documentation"),  # RFC 9637; Python 3.11 calls it global
        ("5f00::1", "private|reserved|not globally"),
        ("64:ff9b:1::a00:1", "private|reserved|not globally"),  # local-use translation: the IPv4 inside is not ours to trust
        ("::8.8.8.8", "private|reserved|not globally"),  # deprecated IPv4-compatible
        # IPv4 inside IPv6: the embedded address decides.
        ("::ffff:127.0.0.1", "loopback .as 127.0.0.1"),
        ("::ffff:10.1.2.3", "private .as 10.1.2.3"),
        ("::ffff:100.64.0.1", "shared address space"),
        ("::ffff:192.0.0.8", "IETF protocol assignments"),
        ("64:ff9b::a00:1", "private .as 10.0.0.1"),  # NAT64
        ("64:ff9b::6440:1", "shared address space"),  # NAT64 of 100.64.0.1
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
        ("2002:a9fe:a9fe::", "cloud metadata"),  # 6to4 of 169.254.169.254
        ("2002:c000:8::", "IETF protocol assignments"),  # 6to4 of 192.0.0.8
    ],
)
def test_blocked_reason(address: str, reason: str | None) -> None:
    # Where the reason reads "private|reserved|...", Python's own classification decides which word wins.
    found = blocked_reason(ipaddress.ip_address(address))
    if reason is None:
        assert found is None
    else:
        assert found is not None and re.search(reason, found), found


def test_every_listed_range_is_refused_in_full() -> None:
    # First and last address of each range the interpreter's own classification misses.
    for cidr in ("192.0.0.0/24", "100.64.0.0/10", "fec0::/10", "3fff::/20", "64:ff9b:1::/48", "2001::/23"):
        network = ipaddress.ip_network(cidr)
        for ip in (network[0], network[-1]):
            assert blocked_reason(ip) is not None, ip
