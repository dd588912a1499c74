"""Dedupe: reuse the verdict of content already judged, exactly (SHA-256) or nearly (PDQ).

`open_store` picks the store the settings ask for; the worker sees only the `DedupeStore` interface.
"""

from __future__ import annotations

from streamguard.config import DedupeSettings, RedisSettings
from streamguard.dedupe.phash import PerceptualHash, from_hex, hamming, perceptual_hash, to_hex
from streamguard.dedupe.redis_store import RedisDedupe
from streamguard.dedupe.store import (
    CachedVerdict,
    DedupeStats,
    DedupeStore,
    NearMatch,
    NullDedupe,
    new_owner_id,
    versions_key,
)


def open_store(settings: DedupeSettings, redis: RedisSettings) -> DedupeStore:
    """Redis when dedupe is enabled, otherwise the no-op store. Opening does no I/O: an unreachable Redis
    shows up on the first call, which then fails soft."""
    if not settings.enabled:
        return NullDedupe()
    return RedisDedupe(settings, redis)


__all__ = [
    "CachedVerdict",
    "DedupeStats",
    "DedupeStore",
    "NearMatch",
    "NullDedupe",
    "PerceptualHash",
    "RedisDedupe",
    "from_hex",
    "hamming",
    "new_owner_id",
    "open_store",
    "perceptual_hash",
    "to_hex",
    "versions_key",
]
