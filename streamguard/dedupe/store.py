"""The dedupe store's narrow interface, its types, and the no-op store.

The worker asks four questions of a store and tells it one thing, and never needs to know what is behind
it (Redis, nothing, or a fake in a test):

- ``get``: was this exact content already judged under these model and policy versions?
- ``acquire`` / ``release``: may I score this content now, or is another worker already on it?
- ``find_near``: was a near-identical image (PDQ) judged?
- ``put``: remember this verdict.

Every method fails open: a store that cannot answer says "no dedupe" (nothing cached, go ahead and score),
so an outage costs duplicate work, never a stalled or failed stream. ``put`` does not release the lease;
the worker calls ``release`` after ``put`` and also after a failed scoring, so that a redelivery of the
record can retry without waiting for the lease to expire.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from streamguard.dedupe.phash import PerceptualHash
from streamguard.schemas import SCHEMA_VERSION, Verdict

VERSIONS_KEY_LENGTH = 16


@dataclass(frozen=True)
class CachedVerdict:
    """A verdict kept for reuse. ``event_id`` is the event first judged, for ``Verdict.duplicate_of``;
    ``tenant`` whose event that was (None: written before tenants, or by the default tenant), so that a
    shared cache never hands one tenant's event ids to another."""

    event_id: str
    verdict_json: str
    sha256: str
    tenant: str | None = None


@dataclass(frozen=True)
class NearMatch:
    """The closest near-duplicate with a cached verdict: its content hash and PDQ distance."""

    sha256: str
    distance: int
    cached: CachedVerdict


@dataclass
class DedupeStats:
    exact_hits: int = 0
    misses: int = 0
    near_hits: int = 0
    near_misses: int = 0
    errors: int = 0
    degraded_calls: int = 0


@runtime_checkable
class DedupeStore(Protocol):
    stats: DedupeStats

    @property
    def available(self) -> bool:
        """False while the store is down and every call gets the "no dedupe" answer."""
        ...

    def get(self, sha256: str, versions_key: str) -> CachedVerdict | None: ...

    def acquire(self, sha256: str, owner: str) -> bool:
        """Take the in-flight lease. True: score it (also when the store cannot say). False: another
        owner holds the lease."""
        ...

    def release(self, sha256: str, owner: str) -> None:
        """Drop the lease if, and only if, ``owner`` holds it."""
        ...

    def renew(self, sha256s: list[str], owner: str) -> None:
        """Extend the leases ``owner`` still holds by the lease time (while it is still scoring)."""
        ...

    def put(self, sha256: str, versions_key: str, verdict: Verdict, phash: PerceptualHash | None) -> None:
        """Keep the verdict and index ``phash`` for near-duplicate search. The lease is not released."""
        ...

    def find_near(self, phash: PerceptualHash, versions_key: str) -> NearMatch | None: ...

    def close(self) -> None: ...


def versions_key(model_versions: dict[str, str], policy_version: str) -> str:
    """A short stable digest of what produced a verdict: change a model, the policy or the verdict schema
    and every cached verdict misses, so content is judged again (and a release never reads verdicts of a
    schema it does not know, e.g. a newer release's during a rolling upgrade)."""
    canonical = json.dumps(
        {"models": model_versions, "policy": policy_version, "verdict_schema": SCHEMA_VERSION},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:VERSIONS_KEY_LENGTH]


def new_owner_id() -> str:
    """A lease owner unique to this process: host and pid for people reading Redis, a random part so a
    restarted process with a recycled pid is a different owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class NullDedupe:
    """No dedupe: nothing is cached and every lease is granted. Used by ``scan`` and when dedupe is
    disabled. It is always ``available``: it is not degraded, it answers as configured."""

    def __init__(self) -> None:
        self.stats = DedupeStats()

    @property
    def available(self) -> bool:
        return True

    def get(self, sha256: str, versions_key: str) -> CachedVerdict | None:
        return None

    def acquire(self, sha256: str, owner: str) -> bool:
        return True

    def release(self, sha256: str, owner: str) -> None:
        return None

    def renew(self, sha256s: list[str], owner: str) -> None:
        return None

    def put(self, sha256: str, versions_key: str, verdict: Verdict, phash: PerceptualHash | None) -> None:
        return None

    def find_near(self, phash: PerceptualHash, versions_key: str) -> NearMatch | None:
        return None

    def close(self) -> None:
        return None
