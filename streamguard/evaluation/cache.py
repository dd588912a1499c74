"""A sqlite cache of evaluation scores, so re-running an evaluation costs reads and hashes, not inference.

Key: (scorer, versions, content sha256, perturbation). ``scorer`` is a detector name or ``fused``;
``versions`` is everything else that moves the number (detector version and options; for fused also every
calibration, the fusion weights and the policy version). The content hash is of the original bytes, so a
perturbed image is found without perturbing it again. A stored NULL value is an abstention; errors are
never stored, so a transient failure is retried next run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import structlog

log = structlog.get_logger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    scorer TEXT NOT NULL,
    versions TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    perturbation TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (scorer, versions, sha256, perturbation)
) WITHOUT ROWID
"""
MISSING: Final = object()  # no stored value (distinct from None, a stored abstention)


class ScoreCache:
    """``get_many``/``put_many`` for one (scorer, versions) pair; ``path=None`` caches nothing."""

    def __init__(self, path: Path | None, scorer: str, versions: str) -> None:
        self._scorer = scorer
        self._versions = versions
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Several evaluations may share a cache directory; wait for a writer instead of failing.
            self._db = sqlite3.connect(path, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            self._db.commit()
            log.debug("eval.cache_opened", path=str(path), scorer=scorer)

    def get_many(self, keys: Sequence[tuple[str, str]]) -> list[object]:
        """The stored value per (sha256, perturbation) key: a float, None (abstained), or `MISSING`."""
        if self._db is None:
            return [MISSING] * len(keys)
        found: dict[tuple[str, str], float | None] = {}
        for sha, tag in set(keys):
            row = self._db.execute(
                "SELECT value FROM scores WHERE scorer=? AND versions=? AND sha256=? AND perturbation=?",
                (self._scorer, self._versions, sha, tag),
            ).fetchone()
            if row is not None:
                found[(sha, tag)] = row[0]
        return [found.get(key, MISSING) for key in keys]

    def put_many(self, items: Iterable[tuple[str, str, float | None]]) -> None:
        if self._db is None:
            return
        self._db.executemany(
            "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)",
            [(self._scorer, self._versions, sha, tag, value) for sha, tag, value in items],
        )
        self._db.commit()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

