"""Fetch the image an event names by URI, without letting the URI reach places it must not.

The URI comes from a producer, so it is untrusted input aimed at a worker that usually sits inside a
private network. Every hop of a fetch is therefore checked where it matters, at the socket:

* A custom httpcore network backend (:class:`_PinnedBackend`) resolves the host itself, refuses the
  connection if *any* resolved address is loopback, private, link-local (cloud metadata included),
  multicast, reserved, unspecified or otherwise not globally routable (IPv4 embedded in IPv6 is unwrapped
  first), unless it lies in ``FetchSettings.allow_networks``, and then connects to exactly the address it
  vetted. Nothing resolves the name a second time, so DNS rebinding between check and connect has no
  window. The URL keeps the hostname, so the ``Host`` header, TLS SNI and certificate verification all
  still use the name.
* Redirects are followed here, one hop at a time, so each target is parsed, scheme-checked and goes
  through the same backend.
* One deadline (``timeout_s``) covers the whole fetch: every socket connect, read and write is clamped to
  what is left of it, so a server that drips one byte at a time cannot hold a worker longer.
* The body is streamed and abandoned as soon as it passes the byte limit. It is read raw: a server may
  send ``Content-Encoding: gzip`` although ``identity`` was asked for, and httpx would inflate each chunk
  whole before any limit applied (1.8 KB of ``gzip, gzip`` becomes gigabytes). Encodings are undone
  here instead, each layer's output capped at the same limit.

Known limit: ``socket.getaddrinfo`` has no timeout, so a hanging resolver can outlast the deadline; the
system resolver's own timeouts (resolv.conf) bound it.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeAlias

import httpcore
import httpx
import structlog

from streamguard.config import FetchSettings
from streamguard.errors import FetchError, FetchFailed, FetchRefused, FetchTooLarge, TooManyRedirects
from streamguard.schemas import ImageEvent

__all__ = ["FetchedImage", "ImageFetcher", "blocked_reason", "event_bytes"]

log = structlog.get_logger(__name__)

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

_SCHEMES = ("http", "https")
# The one status set httpx itself treats as redirects; other 3xx carry no usable Location.
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
# RFC 6052 well-known NAT64 prefix: on a NAT64 network 64:ff9b::a00:1 *is* 10.0.0.1.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# IANA special-purpose ranges that are not globally reachable but that Python 3.11's ipaddress calls
# global (it lists only 192.0.0.0/29 of 192.0.0.0/24, knows nothing of fec0::/10 or 3fff::/20), or that
# later Pythons classify differently (2001::/23 gained exceptions). Listed here so the answer does not
# depend on the interpreter. The whole of 2001::/23 is refused, its few global anycast services (TURN,
# AS112, AMT, ORCHIDv2) included: none of them serves images.
_NOT_GLOBAL: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), reason)
    for cidr, reason in (
        ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("198.18.0.0/15", "benchmarking"),
        ("fec0::/10", "site-local"),
        ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignments"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing (SRv6) SIDs"),
    )
)
# Inside 192.0.0.0/24, the two anycast services IANA marks globally reachable (PCP, TURN).
_GLOBAL_EXCEPTIONS = frozenset({ipaddress.ip_address("192.0.0.9"), ipaddress.ip_address("192.0.0.10")})
# Order matters only for the reason reported: the most specific first.
_BLOCKED_PROPERTIES = (
    ("is_unspecified", "unspecified"),
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_private", "private"),
    ("is_reserved", "reserved"),
)
# Content-Encodings undone after the raw body is read, as zlib window bits to try in order. HTTP's
# "deflate" is meant to be zlib-wrapped, but some servers send raw deflate.
_DECODERS: dict[str, tuple[int, ...]] = {
    "gzip": (16 + zlib.MAX_WBITS,),
    "x-gzip": (16 + zlib.MAX_WBITS,),
    "deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS),
}
_LOG_EVENTS: dict[type[FetchError], str] = {
    FetchRefused: "fetch.refused",
    FetchTooLarge: "fetch.too_large",
    TooManyRedirects: "fetch.too_many_redirects",
    FetchFailed: "fetch.failed",
}

# Absolute time.monotonic() deadline of the fetch running in this thread (or task). A ContextVar rather
# than an attribute because one fetcher, and its pooled connections, may serve several threads at once.
_deadline: ContextVar[float | None] = ContextVar("streamguard_fetch_deadline", default=None)


@dataclass(frozen=True)
class FetchedImage:
    """The body of the final response, with where it came from and what it cost."""

    data: bytes
    content_type: str | None
    final_uri: str
    redirects: int
    elapsed_ms: float


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, where the network would deliver it to that address."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip.sixtofour


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted, or None when it is a public unicast address."""
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        # Python 3.11 classifies ::ffff:127.0.0.1 as neither loopback nor private, so judge the IPv4 inside.
        inner = blocked_reason(embedded)
        return None if inner is None else f"{inner} (as {embedded} inside IPv6)"
    if ip in _METADATA:
        return "link-local (cloud metadata endpoint)"
    for prop, reason in _BLOCKED_PROPERTIES:
        if getattr(ip, prop):
            return reason
    if ip in _GLOBAL_EXCEPTIONS:
        return None
    for network, what in _NOT_GLOBAL:
        if ip in network:
            return f"not globally routable ({what}, {network})"
    if not ip.is_global:
        return "not globally routable"
    return None


def _remaining(default: float | None, error: type[Exception]) -> float | None:
    """``default`` clamped to the current fetch's deadline; raises ``error`` once the deadline is gone."""
    deadline = _deadline.get()
    if deadline is None:
        return default
    left = deadline - time.monotonic()
    if left <= 0:
        # A zero socket timeout would mean non-blocking, not "expired", so never pass one down.
        raise error("fetch deadline exceeded")
    return left if default is None else min(default, left)


class _DeadlineStream(httpcore.NetworkStream):
    """Clamps every socket operation to the fetch deadline; httpcore's own timeouts are per operation."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _remaining(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _remaining(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, _remaining(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(inner)

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.SyncBackend):
    """Resolves and vets the host on every new connection, then connects to the vetted address only."""

    def __init__(self, allow_networks: Iterable[IPNetwork]) -> None:
        self._allow = tuple(allow_networks)

    def _allowed(self, ip: IPAddress) -> bool:
        embedded = _embedded_ipv4(ip)
        return any(ip in net or (embedded is not None and embedded in net) for net in self._allow)

    def vetted_addresses(self, host: str, port: int) -> list[str]:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchFailed(f"could not resolve host {host!r}: {exc}") from exc
        addresses: list[str] = []
        for *_, sockaddr in infos:
            address = str(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise FetchFailed(f"host {host!r} resolved to no address")
        for address in addresses:
            ip = ipaddress.ip_address(address)
            reason = blocked_reason(ip)
            # ANY bad address refuses the host: which one a later connect picks is not ours to predict.
            if reason is not None and not self._allowed(ip):
                raise FetchRefused(f"refused to fetch from host {host!r}: it resolves to {ip}, {reason}")
        return addresses

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self.vetted_addresses(host, port)
        options = list(socket_options or ())
        for address in addresses[:-1]:
            try:
                return self._connect_vetted(address, port, timeout, local_address, options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue  # the host's next address, as socket.create_connection would
        return self._connect_vetted(addresses[-1], port, timeout, local_address, options)

    def _connect_vetted(
        self,
        address: str,
        port: int,
        timeout: float | None,
        local_address: str | None,
        options: list[httpcore.SOCKET_OPTION],
    ) -> httpcore.NetworkStream:
        # ``address`` is an IP literal, so the parent's socket.create_connection resolves nothing: this
        # connects to exactly the address that was vetted.
        timeout_left = _remaining(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(super().connect_tcp(address, port, timeout_left, local_address, options))


def _pinned_transport(backend: _PinnedBackend, ssl_context: ssl.SSLContext) -> httpx.HTTPTransport:
    """An httpx transport whose connections all go through ``backend``.

    httpx 0.28's HTTPTransport takes no network backend, and the only public alternative is re-implementing
    its request/response conversion and exception mapping. So the pool it built is replaced by an equal
    one with our backend: the private ``_pool`` is touched here and nowhere else.
    """
    limits = httpx.Limits()
    transport = httpx.HTTPTransport(verify=ssl_context, trust_env=False, limits=limits)
    if not isinstance(getattr(transport, "_pool", None), httpcore.ConnectionPool):
        # Fail closed: an httpx that no longer keeps its pool there would silently skip every check.
        raise RuntimeError("httpx.HTTPTransport internals changed; cannot install the SSRF-safe backend")
    transport._pool = httpcore.ConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,
    )
    return transport


def _parse(uri: str | httpx.URL) -> httpx.URL:
    try:
        url = uri if isinstance(uri, httpx.URL) else httpx.URL(uri)
    except httpx.InvalidURL as exc:
        raise FetchRefused(f"refused to fetch an invalid URI: {exc}") from None
    if url.scheme not in _SCHEMES:
        raise FetchRefused(f"refused to fetch from host {url.host!r}: scheme {url.scheme!r} is not http(s)")
    if not url.host:
        raise FetchRefused("refused to fetch a URI without a host")
    return url


class ImageFetcher:
    """Fetches image bytes by URI; one per worker, reused across fetches for connection pooling."""

    def __init__(self, settings: FetchSettings, max_bytes: int) -> None:
        self._settings = settings
        self.max_bytes = settings.max_bytes or max_bytes
        allow = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.allow_networks]
        self._client = httpx.Client(
            transport=_pinned_transport(_PinnedBackend(allow), httpx.create_ssl_context()),
            # Redirects are followed by hand so every hop is checked. Proxies from the environment would
            # connect to the proxy instead of the vetted address, so they are ignored (the TLS context above
            # still honours SSL_CERT_FILE for a private CA).
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            headers={
                "User-Agent": settings.user_agent,
                # Images are already compressed; asking for identity keeps Content-Length meaningful. A
                # server that encodes anyway is decoded by _decoded, under the byte limit.
                "Accept-Encoding": "identity",
            },
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def fetch(self, uri: str) -> FetchedImage:
        """GET ``uri`` following at most ``max_redirects`` redirects; raises a :class:`FetchError` subclass."""
        start = time.monotonic()
        token = _deadline.set(start + self._settings.timeout_s)
        try:
            image = self._fetch(uri, start)
        except FetchError as exc:
            log.warning(_LOG_EVENTS.get(type(exc), "fetch.failed"), host=_host_of(uri), error=str(exc))
            raise
        finally:
            _deadline.reset(token)
        # The host only: query strings often carry signed credentials.
        log.debug("fetch.ok", host=_host_of(uri), bytes=len(image.data), redirects=image.redirects,
                  elapsed_ms=round(image.elapsed_ms, 1))
        return image

    def _fetch(self, uri: str, start: float) -> FetchedImage:
        url = _parse(uri)
        redirects = 0
        while True:
            with self._transport_errors(url), self._client.stream("GET", url) as response:
                if response.status_code in _REDIRECT_STATUSES and "location" in response.headers:
                    if redirects >= self._settings.max_redirects:
                        raise TooManyRedirects(
                            f"too many redirects: host {url.host!r} redirected again after {redirects} "
                            f"(limit {self._settings.max_redirects})"
                        )
                    url = self._redirect_target(url, response.headers["location"])
                    redirects += 1
                    continue
                if response.status_code >= 400:
                    raise FetchFailed(f"host {url.host!r} answered HTTP {response.status_code}")
                if not 200 <= response.status_code < 300:
                    raise FetchFailed(f"host {url.host!r} answered unexpected HTTP {response.status_code}")
                data = self._read_body(url, response)
                return FetchedImage(
                    data=data,
                    content_type=response.headers.get("content-type"),
                    final_uri=str(response.url),
                    redirects=redirects,
                    elapsed_ms=(time.monotonic() - start) * 1000,
                )

    @staticmethod
    def _redirect_target(url: httpx.URL, location: str) -> httpx.URL:
        try:
            target = url.join(location)
        except httpx.InvalidURL as exc:
            raise FetchFailed(f"host {url.host!r} redirected to an invalid Location: {exc}") from None
        if target.scheme not in _SCHEMES:
            raise FetchRefused(
                f"refused redirect from host {url.host!r}: scheme {target.scheme!r} is not http(s)"
            )
        return _parse(target)

    def _read_body(self, url: httpx.URL, response: httpx.Response) -> bytes:
        limit = self.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FetchTooLarge(f"host {url.host!r} declared {declared} bytes, over the limit of {limit}")
        body = bytearray()
        # iter_raw, not iter_bytes: the limit must see bytes before any decompression does.
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > limit:
                # Leaving the `with` closes the connection instead of draining the rest of the body.
                raise FetchTooLarge(f"host {url.host!r} sent more than the limit of {limit} bytes")
        return _decoded(url, bytes(body), response.headers.get("content-encoding", ""), limit)

    @contextmanager
    def _transport_errors(self, url: httpx.URL) -> Iterator[None]:
        """Turns httpx's transport errors into FetchFailed naming the host of the hop that failed."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise FetchFailed(
                f"fetching from host {url.host!r} timed out (limit {self._settings.timeout_s:g}s for the "
                f"whole fetch, {self._settings.connect_timeout_s:g}s per connect)"
            ) from exc
        except httpx.ConnectError as exc:
            raise FetchFailed(f"could not connect to host {url.host!r}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise FetchFailed(f"fetching from host {url.host!r} failed: {type(exc).__name__}: {exc}") from exc


def _decoded(url: httpx.URL, body: bytes, content_encoding: str, limit: int) -> bytes:
    """``body`` with its Content-Encoding layers undone (the last applied first), each capped at ``limit``."""
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    for coding in reversed([c for c in codings if c and c != "identity"]):
        if coding not in _DECODERS:
            raise FetchFailed(f"host {url.host!r} sent an unsupported Content-Encoding {coding!r}")
        body = _decode_layer(url, body, coding, limit)
    return body


def _decode_layer(url: httpx.URL, data: bytes, coding: str, limit: int) -> bytes:
    error: zlib.error | None = None
    for wbits in _DECODERS[coding]:
        try:
            inflated = _inflate(data, wbits, limit)
        except zlib.error as exc:
            error = exc
            continue
        if inflated is None:
            raise FetchTooLarge(
                f"host {url.host!r} sent a {coding} body of more than the limit of {limit} bytes once decoded"
            )
        return inflated
    raise FetchFailed(f"host {url.host!r} sent a corrupt {coding} body: {error}")


def _inflate(data: bytes, wbits: int, limit: int) -> bytes | None:
    """``data`` decompressed, or None as soon as the output passes ``limit``; zlib.error when corrupt."""
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(wbits)
        # max_length bounds the allocation itself: a bomb never gets further than limit + 1 bytes.
        out += inflater.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            return None
        if not inflater.eof:
            raise zlib.error("truncated stream")
        data = inflater.unused_data  # gzip allows several members one after another
    return bytes(out)


def _host_of(uri: str) -> str | None:
    try:
        return httpx.URL(uri).host or None
    except httpx.InvalidURL:
        return None


def event_bytes(event: ImageEvent, fetcher: ImageFetcher) -> bytes:
    """The event's image bytes: inline when it carries them, fetched from its URI otherwise."""
    if event.image is not None:
        return event.image
    # ImageEvent guarantees exactly one of image and uri, so uri is set here.
    return fetcher.fetch(str(event.uri)).data
