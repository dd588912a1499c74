"""Banks on Redis: the source of truth, read by exact lookups directly and by the near index on refresh.

Keys, all under ``banks.key_prefix`` (``{p}``):

- ``{p}:banks``: hash, bank name -> ``"{id} {label}"``; a bank keeps the label it was created with.
- ``{p}:seq``: how many entries were ever written; entry ids are 0..seq-1.
- ``{p}:r:{id // 65536}``: string of fixed 68-byte records (`RECORD`: flags, PDQ quality, bank id,
  SHA-256, PDQ), entry ``id`` at byte ``(id % 65536) * 68``. Loading 10M entries is 153 ``GETRANGE`` s of
  4.5 MB, and costs Redis 68 bytes an entry with no per-key overhead.
- ``{p}:x:{sha256[:5]}``: hash, SHA-256 (32 bytes) + bank id (2 bytes) -> entry id: the exact index, and
  what makes adding the same content to the same bank twice a no-op. 2^20 buckets keep each small enough
  for Redis's compact hash encoding at 10M entries (~10 fields each).
- ``{p}:p:{pdq[:5]}``: the same for entries that came with a PDQ hash alone (imported signal lists).
- ``{p}:n:{id // 256}``: hash, entry id -> note, for entries that have one.
- ``{p}:s:{id // 256}``: hash, entry id -> source (the image's URI), for entries that have one (those a
  reviewer decided on a URI event); a flag bit of the record says so, and entries without one cost nothing.
- ``{p}:counts``: hash, bank id -> entries.

Entries are written by one Lua script per batch: the id, the record, the index fields and the count land
together, so a reader that sees ``seq`` = n can read records 0..n-1 complete. The scripts build key names
from their arguments, which a Redis Cluster would refuse; banks need one Redis (or a primary/replica pair).

Matching: the exact lookup is one ``HMGET`` (one field per subscribed bank) and fails open (Redis down:
no exact match, logged once per outage, retried every ``redis.retry_interval_s``); the near lookup reads
the in-memory `NearIndex` and does no I/O.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import structlog
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from streamguard.banks.index import NO_RANK, NearIndex, Rows, hash_words
from streamguard.banks.model import (
    BankEntry,
    BankInfo,
    BankMatch,
    BanksUnavailable,
    Label,
    check_bank_name,
    check_label,
    check_sha256,
)
from streamguard.config import RedisSettings, Settings
from streamguard.dedupe.phash import PerceptualHash

log = structlog.get_logger(__name__)

FLAG_SHA, FLAG_PDQ, FLAG_NOTE, FLAG_SOURCE = 1, 2, 4, 8
RECORD = np.dtype([("flags", "u1"), ("quality", "u1"), ("bank", ">u2"), ("sha", "u1", (32,)),
                   ("pdq", "u1", (32,))])
CHUNK_RECORDS = 1 << 16
NOTE_BUCKET = 256
BUCKET_HEX = 5
MAX_BANKS = 1 << 16
_ADD_BATCH = 1000
_PACK = struct.Struct(">BBH32s32s")

_CREATE_BANK_LUA = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
    v = redis.call('HLEN', KEYS[1]) .. ' ' .. ARGV[2]
    redis.call('HSET', KEYS[1], ARGV[1], v)
end
return v
"""

# ARGV: prefix, records per chunk, record size, the batch's records concatenated, then per entry: index key,
# index field, note, source, bank id. One HSETNX per entry decides whether it is new (and claims its index
# field); the new records are then written with one SETRANGE per chunk, the counters once per batch.
_ADD_LUA = """
local p, chunk, size, blob = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local first = tonumber(redis.call('GET', p .. ':seq') or '0')
local seq, j = first, 0
local pieces, counts, out = {}, {}, {}
for i = 5, #ARGV, 5 do
    j = j + 1
    out[j] = 0
    if redis.call('HSETNX', ARGV[i], ARGV[i + 1], seq) == 1 then
        pieces[#pieces + 1] = string.sub(blob, (j - 1) * size + 1, j * size)
        if ARGV[i + 2] ~= '' then
            redis.call('HSET', p .. ':n:' .. math.floor(seq / 256), seq, ARGV[i + 2])
        end
        if ARGV[i + 3] ~= '' then
            redis.call('HSET', p .. ':s:' .. math.floor(seq / 256), seq, ARGV[i + 3])
        end
        counts[ARGV[i + 4]] = (counts[ARGV[i + 4]] or 0) + 1
        seq = seq + 1
        out[j] = 1
    end
end
local data, id, pos = table.concat(pieces), first, 1
while id < seq do
    local c = math.floor(id / chunk)
    local n = math.min(seq, (c + 1) * chunk) - id
    redis.call('SETRANGE', p .. ':r:' .. c, (id % chunk) * size, string.sub(data, pos, pos + n * size - 1))
    pos, id = pos + n * size, id + n
end
if seq > first then
    redis.call('SET', p .. ':seq', seq)
end
for bank, n in pairs(counts) do
    redis.call('HINCRBY', p .. ':counts', bank, n)
end
return out
"""

assert RECORD.itemsize == _PACK.size == 68


def redacted_url(url: str) -> str:
    return RedisSettings.model_construct(url=url).model_dump(mode="json")["url"]


class BankStore:
    """Named banks of known AI-generated and known-real content. Safe to share between threads."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        banks = settings.banks
        self._prefix = banks.key_prefix
        self._url = banks.redis_url or settings.redis.url
        self.max_distance = (banks.near_max_distance if banks.near_max_distance is not None
                             else settings.dedupe.near_max_distance)
        self.min_quality = (banks.near_min_quality if banks.near_min_quality is not None
                            else settings.dedupe.near_min_quality)
        self._refresh_interval_s = banks.refresh_interval_s
        self._retry_interval_s = settings.redis.retry_interval_s
        self._clock = clock
        self._client = Redis.from_url(
            self._url,
            socket_timeout=settings.redis.socket_timeout_s,
            socket_connect_timeout=settings.redis.socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            **settings.redis.tls_options(),
        )
        self._create_bank = self._client.register_script(_CREATE_BANK_LUA)
        self._add_script = self._client.register_script(_ADD_LUA)
        self._banks: dict[str, tuple[int, Label]] = {}
        self._by_id: dict[int, tuple[str, Label]] = {}
        self._ranks: dict[tuple[int, ...], np.ndarray] = {}
        self._index = NearIndex.empty()
        self._loaded = 0
        self._index_live = False
        self._refresh_lock = threading.Lock()
        self._down_until = 0.0
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    # -- matching ----------------------------------------------------------------------------------

    def match(self, sha256: str, pdq: PerceptualHash | None, banks: Sequence[str],
              fail_open: bool = True) -> BankMatch | None:
        """The first of ``banks`` holding this exact content; else the nearest PDQ within the distance
        (ties: the earlier bank in ``banks``). Banks nobody has written to yet match nothing. With
        ``fail_open`` False a Redis failure raises `BanksUnavailable` instead of answering "no match" (a
        bank audit must not pass content by as unbanked)."""
        check_sha256(sha256)
        known = [(name, *self._banks[name]) for name in banks if name in self._banks]
        if not known:
            return None
        if not fail_open:
            with self._errors("match"):
                exact = self._exact_lookup(sha256, known)
        else:
            exact = self._exact(sha256, known)
        if exact is not None:
            return exact
        if pdq is None or pdq.quality < self.min_quality:
            return None
        hit = self._index.nearest(pdq.bits, self.max_distance, self._rank(tuple(bank for _, bank, _ in known)))
        if hit is None:
            return None
        name, label = self._by_id[hit.bank]
        return BankMatch(bank=name, label=label, kind="near", distance=hit.distance, content_sha256=hit.sha256)

    def _exact(self, sha256: str, known: list[tuple[str, int, Label]]) -> BankMatch | None:
        if self._clock() < self._down_until:
            return None
        try:
            return self._exact_lookup(sha256, known)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # A dead Redis must cost one socket timeout per retry interval, not one per image.
            self._down_until = self._clock() + self._retry_interval_s
            log.warning("banks.redis_down", url=redacted_url(self._url), error=repr(exc),
                        retry_interval_s=self._retry_interval_s)
            self._client.connection_pool.disconnect()
            return None
        except RedisError as exc:
            log.warning("banks.redis_error", op="match", error=repr(exc))
            return None

    def _exact_lookup(self, sha256: str, known: list[tuple[str, int, Label]]) -> BankMatch | None:
        digest = bytes.fromhex(sha256)
        found = self._client.hmget(self._bucket("x", sha256), [digest + bank.to_bytes(2, "big")
                                                               for _, bank, _ in known])
        for (name, _, label), value in zip(known, found, strict=True):
            if value is not None:
                return BankMatch(bank=name, label=label, kind="exact", distance=0, content_sha256=sha256)
        return None

    def _rank(self, bank_ids: tuple[int, ...]) -> np.ndarray:
        rank = self._ranks.get(bank_ids)
        if rank is None:
            rank = np.full(MAX_BANKS, NO_RANK, dtype=np.int32)
            for position, bank in reversed(list(enumerate(bank_ids))):
                rank[bank] = position
            if len(self._ranks) > 64:
                self._ranks.clear()
            self._ranks[bank_ids] = rank
        return rank

    # -- adding ------------------------------------------------------------------------------------

    def add(self, bank: str, label: Label, sha256: str, pdq: PerceptualHash | None, note: str | None = None,
            source: str | None = None) -> None:
        """Bank content by its SHA-256 and, if given, its PDQ hash (near-matched only at or above the
        quality rule). Adding content already in the bank changes nothing."""
        self.add_many([BankEntry(bank=bank, label=label, sha256=sha256, pdq=pdq, note=note, source=source)])

    def add_many(self, entries: Iterable[BankEntry]) -> int:
        """Bank entries in batches; returns how many were new."""
        added = 0
        with self._errors("add"):
            batch: list[BankEntry] = []
            for entry in entries:
                batch.append(entry)
                if len(batch) == _ADD_BATCH:
                    added += self._add_batch(batch)
                    batch = []
            if batch:
                added += self._add_batch(batch)
        if added and self._index_live:
            self.refresh()
        return added

    def _add_batch(self, batch: list[BankEntry]) -> int:
        records: list[bytes] = []
        args: list[bytes | str | int] = []
        for entry in batch:
            bank = self._bank_id(entry.bank, entry.label)
            bank_bytes = bank.to_bytes(2, "big")
            flags = ((FLAG_SHA if entry.sha256 else 0) | (FLAG_PDQ if entry.pdq else 0)
                     | (FLAG_NOTE if entry.note else 0) | (FLAG_SOURCE if entry.source else 0))
            sha = bytes.fromhex(entry.sha256) if entry.sha256 else bytes(32)
            pdq = entry.pdq.bits if entry.pdq else bytes(32)
            if entry.sha256:
                key, field = self._bucket("x", entry.sha256), sha + bank_bytes
            else:
                key, field = self._bucket("p", pdq.hex()), pdq + bank_bytes
            records.append(_PACK.pack(flags, entry.pdq.quality if entry.pdq else 0, bank, sha, pdq))
            args += [key, field, entry.note or "", entry.source or "", bank]
        head: list[bytes | str | int] = [self._prefix, CHUNK_RECORDS, RECORD.itemsize, b"".join(records)]
        return sum(self._add_script(keys=[], args=head + args))

    def _bank_id(self, name: str, label: Label) -> int:
        known = self._banks.get(name)
        if known is None:
            check_bank_name(name)
            check_label(label)
            raw = self._create_bank(keys=[self._key("banks")], args=[name, label])
            known = self._remember_bank(name, raw)
        if known[1] != label:
            raise ValueError(f"bank {name!r} holds {known[1]} content, not {label}")
        return known[0]

    def _remember_bank(self, name: str, raw: bytes) -> tuple[int, Label]:
        bank_id, _, label = raw.decode().partition(" ")
        if int(bank_id) >= MAX_BANKS:
            raise ValueError(f"more than {MAX_BANKS} banks")
        known = (int(bank_id), check_label(label))
        self._banks[name] = known
        self._by_id[known[0]] = (name, known[1])
        return known

    # -- banks, loading and reading back ---------------------------------------------------------

    def ensure_banks(self, definitions: dict[str, Label]) -> None:
        """Create the configured banks that do not exist yet; refuse a configured label that differs from
        the one a bank already holds (its content would change meaning)."""
        with self._errors("create banks"):
            for name, label in definitions.items():
                raw = self._create_bank(keys=[self._key("banks")], args=[check_bank_name(name), check_label(label)])
                stored = self._remember_bank(name, raw)[1]
                if stored != label:
                    raise ValueError(f"banks.definitions says {name!r} is {label}, but the bank in Redis holds "
                                     f"{stored} content")

    def refresh(self) -> int:
        """Load entries added since the last refresh into the near index; returns how many."""
        with self._refresh_lock, self._errors("refresh"):
            self._load_banks()
            seq = int(self._client.get(self._key("seq")) or 0)
            parts = [self._rows(records) for records in self._records(self._loaded, seq)]
            if parts:
                self._index = self._index.with_rows(Rows.concat(parts))
            loaded, self._loaded, self._index_live = seq - self._loaded, seq, True
            return loaded

    @property
    def index(self) -> NearIndex:
        return self._index

    def banks(self) -> list[BankInfo]:
        with self._errors("list banks"):
            self._load_banks()
            counts = {int(k): int(v) for k, v in self._client.hgetall(self._key("counts")).items()}
        return sorted((BankInfo(name, label, counts.get(bank, 0)) for name, (bank, label) in list(self._banks.items())),
                      key=lambda info: info.name)

    def entries(self, bank: str) -> Iterator[BankEntry]:
        """Every entry of ``bank``, in the order they were added."""
        for _, entry in self.entries_between(bank, 0, self.written()):
            yield entry

    def written(self) -> int:
        """Entries ever written, of every bank: entry ids are below it."""
        with self._errors("read"):
            return int(self._client.get(self._key("seq")) or 0)

    def entries_between(self, bank: str, start: int, stop: int) -> Iterator[tuple[int, BankEntry]]:
        """``(entry id, entry)`` of ``bank`` with ids in ``start..stop-1``, in id order. The ids of one bank
        are not contiguous (banks share one sequence), so a caller that resumes keeps the last id seen."""
        with self._errors("read"):
            self._load_banks()
            if bank not in self._banks:
                raise ValueError(f"no bank named {bank!r}")
            bank_id, label = self._banks[bank]
            for first, records in self._records(start, stop, with_ids=True):
                ids = np.flatnonzero(records["bank"] == bank_id)
                notes = self._texts("n", [first + int(i) for i in ids if records["flags"][i] & FLAG_NOTE])
                sources = self._texts("s", [first + int(i) for i in ids if records["flags"][i] & FLAG_SOURCE])
                for i in ids:
                    entry_id = first + int(i)
                    yield entry_id, _entry(records[i], bank, label, notes.get(entry_id), sources.get(entry_id))

    def ping(self) -> None:
        with self._errors("connect"):
            self._client.ping()

    def _load_banks(self) -> None:
        for name, raw in self._client.hgetall(self._key("banks")).items():
            self._remember_bank(name.decode(), raw)

    def _records(self, start: int, stop: int, with_ids: bool = False) -> Iterator:
        """Records ``start..stop-1``, a chunk at a time (with each chunk's first id if ``with_ids``)."""
        size = RECORD.itemsize
        while start < stop:
            chunk, offset = divmod(start, CHUNK_RECORDS)
            end = min(stop, (chunk + 1) * CHUNK_RECORDS)
            raw = self._client.getrange(self._key("r", str(chunk)), offset * size, (offset + end - start) * size - 1)
            records = np.frombuffer(raw, dtype=RECORD)
            yield (start, records) if with_ids else records
            start = end

    def _rows(self, records: np.ndarray) -> Rows:
        usable = records[((records["flags"] & FLAG_PDQ) != 0) & (records["quality"] >= self.min_quality)]
        return Rows(words=hash_words(np.ascontiguousarray(usable["pdq"])), banks=usable["bank"].astype(np.uint16),
                    shas=np.ascontiguousarray(usable["sha"]), has_sha=(usable["flags"] & FLAG_SHA) != 0)

    def _texts(self, kind: str, ids: list[int]) -> dict[int, str]:
        """Notes (``kind`` "n") or sources ("s") of the entries ``ids``."""
        if not ids:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hget(self._key(kind, str(entry_id // NOTE_BUCKET)), entry_id)
        return {entry_id: raw.decode() for entry_id, raw in zip(ids, pipe.execute(), strict=True) if raw is not None}

    # -- background refresh, lifecycle -------------------------------------------------------------

    def start_refresher(self) -> None:
        """Refresh every ``banks.refresh_interval_s`` in a daemon thread until `close`."""
        if self._refresh_interval_s > 0 and self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_loop, name="banks-refresh", daemon=True)
            self._refresher.start()

    def _refresh_loop(self) -> None:
        failing = False
        while not self._stop.wait(self._refresh_interval_s):
            try:
                loaded = self.refresh()
            except BanksUnavailable as exc:
                if not failing:
                    log.warning("banks.refresh_failed", error=str(exc))
                failing = True
                continue
            if failing or loaded:
                log.info("banks.refreshed", loaded=loaded, near_hashes=len(self._index))
            failing = False

    def close(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        self._client.close()

    # -- keys and errors ---------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    def _bucket(self, kind: str, hex_digest: str) -> str:
        return self._key(kind, hex_digest[:BUCKET_HEX])

    @contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            raise BanksUnavailable(f"banks: {op} failed, Redis at {redacted_url(self._url)}: "
                                   f"{type(exc).__name__}: {exc}") from exc


def _entry(record: np.void, bank: str, label: Label, note: str | None, source: str | None) -> BankEntry:
    flags = int(record["flags"])
    sha = record["sha"].tobytes().hex() if flags & FLAG_SHA else None
    pdq = PerceptualHash(bits=record["pdq"].tobytes(), quality=int(record["quality"])) if flags & FLAG_PDQ else None
    return BankEntry(bank=bank, label=label, sha256=sha, pdq=pdq, note=note, source=source)


def open_banks(settings: Settings) -> BankStore | None:
    """The banks the worker matches against, loaded and refreshing; None when ``banks.definitions`` is
    empty. Raises `BanksUnavailable` when Redis cannot be reached: configured banks that cannot be loaded
    must stop the start, not silently match nothing."""
    if not settings.banks.definitions:
        return None
    store = BankStore(settings)
    try:
        store.ensure_banks(settings.banks.definitions)
        started = time.perf_counter()
        store.refresh()
    except BaseException:
        store.close()
        raise
    log.info("banks.loaded", banks=len(settings.banks.definitions), near_hashes=len(store.index),
             index_mib=round(store.index.nbytes() / 2**20, 1), seconds=round(time.perf_counter() - started, 2))
    store.start_refresher()
    return store
