"""API keys of `streamguard serve`: who is asking, and for which tenant they may ask.

Keys are known only by their SHA-256: from the configuration (`serve.api_keys`, hashes only) and from a
secret file (`serve.api_keys_file`, as a Kubernetes Secret mounts it), which is read again when it
changes so a rotated key takes effect without a restart. A presented key is hashed and compared with
every known digest in constant time, never stopping at the first match, so the answer's timing says
nothing about which keys exist. Plain SHA-256 suffices: API keys are long random strings, not passwords
to stretch.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from streamguard.config import ServeSettings

log = structlog.get_logger(__name__)

_HASHED_PREFIX = "sha256:"
# A changed file is noticed within this long; checking its mtime per request would cost a stat each.
_FILE_CHECK_S = 1.0


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    tenant: str | None = None
    rate_per_s: float | None = None
    burst: int | None = None


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the line, never a key."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def read_key_file(path: Path) -> list[ApiKey]:
    """``NAME KEY [TENANT]`` a line; ``#`` starts a comment; KEY is the key itself or ``sha256:HEX``."""
    keys = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise KeyFileError(f"{path}:{number}: expected NAME KEY [TENANT], got {len(fields)} fields")
        name, key, tenant = fields[0], fields[1], fields[2] if len(fields) == 3 else None
        if key.startswith(_HASHED_PREFIX):
            try:
                hashed = bytes.fromhex(key[len(_HASHED_PREFIX):])
            except ValueError:
                raise KeyFileError(f"{path}:{number}: {_HASHED_PREFIX} needs 64 hex digits") from None
            if len(hashed) != 32:
                raise KeyFileError(f"{path}:{number}: {_HASHED_PREFIX} needs 64 hex digits")
        else:
            hashed = digest(key)
        keys.append(ApiKey(name, hashed, tenant))
    return keys


class KeyRing:
    def __init__(self, settings: ServeSettings) -> None:
        self._configured = [ApiKey(k.name, bytes.fromhex(k.sha256), k.tenant, k.rate_per_s, k.burst)
                            for k in settings.api_keys]
        self._file = settings.api_keys_file
        self._file_keys: list[ApiKey] = []
        self._file_mtime: int | None = None
        self._checked = 0.0
        if self._file is not None:
            self._reload(force=True)  # a broken file at start is a configuration error: raise

    def __len__(self) -> int:
        return len(self._configured) + len(self._file_keys)

    def find(self, presented: str) -> ApiKey | None:
        self._maybe_reload()
        wanted = digest(presented)
        found = None
        for key in self._configured + self._file_keys:
            if hmac.compare_digest(wanted, key.digest) and found is None:
                found = key
        return found

    def _maybe_reload(self) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        if now - self._checked < _FILE_CHECK_S:
            return
        self._checked = now
        try:
            self._reload(force=False)
        except (OSError, KeyFileError) as exc:
            # Keep serving with the keys last read: a half-written rotation must not lock everyone out.
            log.warning("serve.key_file_unreadable", path=str(self._file), error=str(exc))

    def _reload(self, force: bool) -> None:
        assert self._file is not None
        mtime = os.stat(self._file).st_mtime_ns
        if not force and mtime == self._file_mtime:
            return
        keys = read_key_file(self._file)
        # One assignment: a request thread reading the list sees the old keys or the new, never a mix.
        self._file_keys, self._file_mtime = keys, mtime
        log.info("serve.keys_loaded", path=str(self._file), keys=len(keys))
