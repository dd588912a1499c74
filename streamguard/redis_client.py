"""The one way streamguard opens Redis: dedupe, hash banks, shared rate limits and offline tools alike."""

from __future__ import annotations

from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamguard.config import RedisSettings


def connect(settings: RedisSettings, *, url: str | None = None, decode_responses: bool = False,
            in_stream: bool = True) -> Redis:
    """A client for ``url`` (default ``settings.url``) with the settings' timeouts and TLS files.

    ``in_stream``: the caller serves traffic and fails open when Redis is away, so a command must fail at
    once: redis-py (8.1) retries with exponential backoff by default, which would hold every record
    or request behind a dead Redis. Offline tools (``in_stream=False``) keep redis-py's retries."""
    return Redis.from_url(
        url or settings.url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        decode_responses=decode_responses,
        **({"retry": Retry(NoBackoff(), 0)} if in_stream else {}),
        # rediss:// URLs: the CA to verify the server with, and a client certificate for mutual TLS.
        **settings.tls_options(),
    )
