"""The in-memory near-match index over banked PDQ hashes: multi-index hashing in numpy.

Why in memory, and why this scheme (numbers for 10M random hashes, PDQ's distance 31):

- **Where.** Redis stays the source of truth (`streamguard.banks.store`); each worker loads the PDQ hashes
  once and then only the additions. Answering near queries inside Redis instead means either moving the
  candidates to the client (below: ~41K per query at 10M, 1.3 MB of hashes, for every image) or ranking
  them in Lua, which blocks the server every worker shares. A local index costs Redis one ``GET`` per
  refresh.
- **Chunking.** Each 256-bit hash is cut into 16 bands of 16 bits (the dedupe index's bands,
  `streamguard.dedupe.redis_store.band_probes`): two hashes within distance d differ in at most
  floor(d / 16) bits in some band (pigeonhole), so probing every value within r = floor(d / 16) bits of
  each of our 16 band values finds every match: exact recall, no tuning. For d = 31 that is 16 x 17 = 272
  cells, each holding N / 65536 hashes on average: ~41K candidates at 10M (N / 241), checked with a
  vectorised popcount. The alternatives: d + 1 = 32 chunks of 8 bits needs no neighbour probes, but a
  chunk value is shared by N / 256 hashes, 32 x 39K = 1.25M candidates; 8 chunks of 32 bits (r = 3)
  leave ~100 candidates but need 43,912 probes, each a binary search in a sorted array of N keys.
  16 x 16 probes a dense offset table directly and checks the candidates with one gather and a popcount.
  Measured (`bench/bench_banks.py`, this shared 2-core machine under load): p50 1.5 ms at 1M against
  260 ms for a numpy linear scan (174x); 36 ms at 10M against 1.9 s (51x), where the ~41K candidates'
  random reads into 320 MB of hashes dominate.
- **Memory.** Per hash: 32 bytes of bits, 32 of content SHA-256 (so a hit needs no second round trip),
  2 of bank id, and 16 x 4 bytes of postings (row numbers sorted by band value), plus a fixed 8 MiB offset
  table: 133 MiB per million hashes measured, 1.32 GB per worker process at 10M; Redis holds ~195 bytes
  an item at 1M (less as the exact index's buckets fill). HMA's stated target is 10M PDQ hashes in under
  8 GB.
- **Withdrawals.** Rows are never removed (Redis is append-only, and a withdrawal can be undone by adding
  the content again); a withdrawn row is masked instead: each `Rows` may carry ``dead``, the sorted row
  numbers that must not answer, checked only against the few candidates already within the distance.
  Without withdrawals it is None: no byte per hash; with them, 8 bytes per withdrawn row.
- **Freshness.** A snapshot is immutable: queries read whichever snapshot is current without locks.
  Additions land in a small delta table scanned linearly (at most `DELTA_MAX` rows, ~1 ms); past that
  the postings are rebuilt in the refresher thread (a stable radix sort of uint16 per band; 1.1 s at 1M,
  26 s at 10M on this loaded machine) and swapped in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np

from streamguard.dedupe.phash import HASH_BYTES
from streamguard.dedupe.redis_store import BAND_BITS, BANDS

WORDS = HASH_BYTES // 2  # the hash as 16 native uint16, each one band
CELLS = 1 << BAND_BITS
DELTA_MAX = 32_768
NO_RANK = np.iinfo(np.int32).max

# Bits set in every uint16: the popcount of an XOR is the Hamming distance of that band.
_POPCOUNT16 = np.array([bin(v).count("1") for v in range(1 << 16)], dtype=np.uint8)

assert BANDS == WORDS and BAND_BITS == 16, "the index reads each band as one uint16 word"


@lru_cache(maxsize=8)
def band_masks(radius: int) -> np.ndarray:
    """Every 16-bit mask with at most ``radius`` bits set, 0 first."""
    return np.array([sum(1 << b for b in bits) for k in range(radius + 1)
                     for bits in combinations(range(BAND_BITS), k)], dtype=np.uint16)


def hash_words(bits: bytes | np.ndarray) -> np.ndarray:
    """PDQ bits (32 bytes, or an (N, 32) uint8 array) as native uint16 bands, most significant first."""
    raw = np.frombuffer(bits, dtype=np.uint8) if isinstance(bits, bytes) else bits
    return raw.reshape(-1, HASH_BYTES).view(">u2").astype(np.uint16)


def probe_cells(words: np.ndarray, max_distance: int) -> np.ndarray:
    """Flat cell numbers (band * 65536 + value) to read for one hash's (16,) words."""
    masks = band_masks(max_distance // BANDS)
    values = words[:, None] ^ masks[None, :]
    return (np.arange(BANDS, dtype=np.int64)[:, None] * CELLS + values).ravel()


@dataclass(frozen=True)
class Rows:
    """Banked PDQ hashes: (N, 16) uint16 words, (N,) uint16 bank ids, (N, 32) uint8 content SHA-256
    (all zero where the entry came without one: ``has_sha`` says which). ``dead``: sorted int64 row numbers
    of withdrawn rows, which never answer; None when there are none."""

    words: np.ndarray
    banks: np.ndarray
    shas: np.ndarray
    has_sha: np.ndarray
    dead: np.ndarray | None = None

    @classmethod
    def empty(cls) -> Rows:
        return cls(np.empty((0, WORDS), np.uint16), np.empty(0, np.uint16), np.empty((0, 32), np.uint8),
                   np.empty(0, bool))

    def __len__(self) -> int:
        return len(self.banks)

    def nbytes(self) -> int:
        return (self.words.nbytes + self.banks.nbytes + self.shas.nbytes + self.has_sha.nbytes
                + (self.dead.nbytes if self.dead is not None else 0))

    def bits(self, rows: np.ndarray) -> np.ndarray:
        """The PDQ bits of ``rows`` as (k, 32) uint8, as banked (the inverse of `hash_words`)."""
        return self.words[rows].astype(">u2").view(np.uint8).reshape(-1, HASH_BYTES)

    def with_dead(self, dead: np.ndarray | None) -> Rows:
        """These rows with ``dead`` (row numbers, any order) masked instead of whatever was masked before."""
        if dead is not None:
            dead = np.unique(dead.astype(np.int64)) if len(dead) else None
        return Rows(self.words, self.banks, self.shas, self.has_sha, dead)

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        parts = [p for p in parts if len(p)]
        if len(parts) <= 1:
            return parts[0] if parts else Rows.empty()
        dead, start = [], 0
        for part in parts:
            if part.dead is not None:
                dead.append(part.dead + start)
            start += len(part)
        return Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("words", "banks", "shas",
                                                                                "has_sha")),
                    dead=np.concatenate(dead) if dead else None)


@dataclass(frozen=True)
class Hit:
    distance: int
    bank: int
    sha256: str  # "" when the banked hash came without its content's SHA-256


@dataclass(frozen=True)
class NearIndex:
    """One immutable snapshot: ``main`` with its postings, ``delta`` scanned linearly."""

    main: Rows
    postings: np.ndarray  # (16 * N,) uint32 row numbers, grouped by cell
    offsets: np.ndarray  # (16 * 65536 + 1,) int64: cell c's rows are postings[offsets[c]:offsets[c + 1]]
    delta: Rows

    @classmethod
    def build(cls, rows: Rows) -> NearIndex:
        n = len(rows)
        postings = np.empty(BANDS * n, dtype=np.uint32)
        counts = np.empty(BANDS * CELLS, dtype=np.int64)
        for band in range(BANDS):
            column = rows.words[:, band]
            # uint16 keys: numpy's stable sort is a radix sort here, linear in N.
            postings[band * n:(band + 1) * n] = np.argsort(column, kind="stable")
            counts[band * CELLS:(band + 1) * CELLS] = np.bincount(column, minlength=CELLS)
        offsets = np.zeros(BANDS * CELLS + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(rows, postings, offsets, Rows.empty())

    @classmethod
    def empty(cls) -> NearIndex:
        return cls.build(Rows.empty())

    def __len__(self) -> int:
        return len(self.main) + len(self.delta)

    def nbytes(self) -> int:
        return self.main.nbytes() + self.postings.nbytes + self.offsets.nbytes + self.delta.nbytes()

    def masked(self, dead_of: Callable[[Rows], np.ndarray | None]) -> NearIndex:
        """A new snapshot whose withdrawn rows are ``dead_of`` (main, then delta); the postings are shared."""
        return NearIndex(self.main.with_dead(dead_of(self.main)), self.postings, self.offsets,
                         self.delta.with_dead(dead_of(self.delta)))

    def with_rows(self, rows: Rows) -> NearIndex:
        """A new snapshot holding ``rows`` too; this one is unchanged."""
        if not len(rows):
            return self
        if len(self.delta) + len(rows) <= DELTA_MAX:
            return NearIndex(self.main, self.postings, self.offsets, Rows.concat([self.delta, rows]))
        return NearIndex.build(Rows.concat([self.main, self.delta, rows]))

    def nearest(self, bits: bytes, max_distance: int, rank: np.ndarray) -> Hit | None:
        """The closest banked hash within ``max_distance`` whose bank has a rank (``rank[bank]`` below
        `NO_RANK`); of equally close ones, the lowest rank."""
        words = hash_words(bits)[0]
        best: tuple[int, int, int, Rows] | None = None
        for rows, candidates in ((self.main, self._candidates(words, max_distance)), (self.delta, None)):
            if not len(rows):
                continue
            found = _closest(rows, candidates, words, max_distance, rank)
            if found is not None and (best is None or found[:2] < best[:2]):
                best = (*found, rows)
        if best is None:
            return None
        distance, _, row, rows = best
        sha = rows.shas[row].tobytes().hex() if rows.has_sha[row] else ""
        return Hit(distance=int(distance), bank=int(rows.banks[row]), sha256=sha)

    def _candidates(self, words: np.ndarray, max_distance: int) -> np.ndarray:
        cells = probe_cells(words, max_distance)
        starts = self.offsets[cells]
        lengths = self.offsets[cells + 1] - starts
        total = int(lengths.sum())
        if total == 0:
            return np.empty(0, dtype=np.uint32)
        # The concatenation of every probed cell's slice of postings, without a Python loop.
        ends = np.cumsum(lengths)
        index = np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)
        return self.postings[index]


def _closest(rows: Rows, candidates: np.ndarray | None, words: np.ndarray, max_distance: int,
             rank: np.ndarray) -> tuple[int, int, int] | None:
    """(distance, rank, row) of the best candidate row (every row when ``candidates`` is None)."""
    cand_words = rows.words if candidates is None else rows.words[candidates]
    distances = _POPCOUNT16[cand_words ^ words].sum(axis=1, dtype=np.int32)
    ranks = rank[rows.banks if candidates is None else rows.banks[candidates]]
    ok = (distances <= max_distance) & (ranks < NO_RANK)
    if not ok.any():
        return None
    if rows.dead is not None:
        # Withdrawn rows, checked only among the few already within the distance: the next best answers.
        within = np.flatnonzero(ok)
        ids = within if candidates is None else candidates[within].astype(np.int64)
        ok[within[np.isin(ids, rows.dead)]] = False
        if not ok.any():
            return None
    key = np.where(ok, distances.astype(np.int64) * (1 << 32) + ranks, np.iinfo(np.int64).max)
    at = int(np.argmin(key))
    row = at if candidates is None else int(candidates[at])
    return int(distances[at]), int(ranks[at]), row
