"""Earlier judgements of content from the dedupe cache, for re-scoring files that carry no verdict.

A cached verdict is stored under the versions key of the models and policy that produced it (and of the
tenant pool), so after an upgrade the old verdicts sit under keys the current worker never reads. This
reads them directly: the key layout is the one `streamguard.dedupe.redis_store` documents,
``{namespace}:v:{versions}:{sha256}``. The versions keys to look under are named by the operator or found
once, at the start of a run, by scanning the namespace.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from pydantic import ValidationError
from redis import Redis

from streamguard.config import RedisSettings
from streamguard.redis_client import connect
from streamguard.schemas import Verdict

log = structlog.get_logger(__name__)

_SHA_HEX = 64


def redis_client(settings: RedisSettings) -> Redis:
    return connect(settings, decode_responses=True, in_stream=False)


def discover_versions_keys(client: Redis, namespace: str) -> list[str]:
    """Every versions key (tenant pools included) that has a cached verdict in ``namespace``."""
    prefix = f"{namespace}:v:"
    found: set[str] = set()
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        middle = key[len(prefix):-(_SHA_HEX + 1)]
        if middle and key[-(_SHA_HEX + 1)] == ":":
            found.add(middle)
    log.info("rescore.versions_keys_found", namespace=namespace, versions_keys=sorted(found))
    return sorted(found)


class PreviousVerdicts:
    """The newest readable cached verdict of each content under any of ``versions_keys``, per tenant pool.

    A versions key is ``{digest}`` or ``{digest}.{pool}`` (`Tenant.dedupe_key`): an upgrade changes the
    digest and keeps the pool, so the newest verdict of each pool is that pool's current judgement, and
    each is re-judged for its own tenant's event."""

    def __init__(self, client: Redis, namespace: str, versions_keys: Sequence[str], current: str) -> None:
        """``current``: the versions key of the models re-judging now. Its entries are read too, in every pool
        of ``versions_keys``: once a file's content is re-judged, a copy met later (or after a restart) finds
        the new judgement as the newest and is not published again."""
        self._client = client
        self._namespace = namespace
        pools = {key.partition(".")[2] for key in versions_keys}
        self._keys = sorted({*versions_keys, *(f"{current}.{pool}" if pool else current for pool in pools)})

    def latest(self, sha256s: Sequence[str]) -> dict[str, list[Verdict]]:
        """One round trip for a whole chunk. Raises redis errors: without the cache nothing can be compared,
        and a chunk compared against nothing would be skipped for good."""
        if not sha256s or not self._keys:
            return {}
        names = [f"{self._namespace}:v:{key}:{sha}" for sha in sha256s for key in self._keys]
        raws = self._client.mget(names)
        out: dict[str, list[Verdict]] = {}
        for i, sha in enumerate(sha256s):
            pools: dict[str, Verdict] = {}
            for key, raw in zip(self._keys, raws[i * len(self._keys):(i + 1) * len(self._keys)], strict=True):
                verdict = _readable(raw)
                pool = key.partition(".")[2]
                if verdict is not None and (pool not in pools or verdict.judged_at > pools[pool].judged_at):
                    pools[pool] = verdict
            if pools:
                out[sha] = list(pools.values())
        return out


def _readable(raw: str | None) -> Verdict | None:
    if raw is None:
        return None
    try:
        return Verdict.model_validate_json(raw)
    except (ValidationError, ValueError):
        return None  # a newer release's or a tampered entry: not a judgement this version can compare
