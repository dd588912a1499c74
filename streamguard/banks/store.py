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
- ``{p}:w``: set of withdrawn signals, each bank id (2 bytes) + ``s`` or ``p`` + SHA-256 or PDQ (32 bytes);
  ``{p}:wv``: a counter bumped whenever that set changes, so a refresh reloads it only then. Both exist only
  once something was withdrawn: banks without withdrawals cost nothing more (see `BankStore.withdraw`).

Entries are written by one Lua script per batch: the id, the record, the index fields and the count land
together, so a reader that sees ``seq`` = n can read records 0..n-1 complete. The scripts build key names
from their arguments, which a Redis Cluster would refuse; banks need one Redis (or a primary/replica pair).

Matching: the exact lookup is one ``HMGET`` (one field per subscribed bank) and one ``SMISMEMBER`` of the
withdrawn set, pipelined in one round trip, and fails open (Redis down:
no exact match, logged once per outage, retried every ``redis.retry_interval_s``); the near lookup reads
the in-memory `NearIndex` and does no I/O.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
from streamguard.redis_client import connect

log = structlog.get_logger(__name__)

FLAG_SHA, FLAG_PDQ, FLAG_NOTE, FLAG_SOURCE = 1, 2, 4, 8
RECORD = np.dtype([("flags", "u1"), ("quality", "u1"), ("bank", ">u2"), ("sha", "u1", (32,)),
                   ("pdq", "u1", (32,))])
CHUNK_RECORDS = 1 << 16
NOTE_BUCKET = 256
BUCKET_HEX = 5
MAX_BANKS = 1 << 16
_ADD_BATCH = 1000
_SIGNAL_SHA, _SIGNAL_PDQ = b"s", b"p"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
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
# index field, note, source, bank id, withdrawn-set member of its SHA-256 and of its PDQ ('' for none). One
# HSETNX per entry decides whether it is new (and claims its index field); the new records are then written
# with one SETRANGE per chunk, the counters once per batch. Adding withdrawn content again takes it out of
# the withdrawn set (the latest decision holds), which costs one EXISTS a batch where nothing was withdrawn.
# Returns one 0/1 per entry (new or not), then how many withdrawn signals were restored.
_ADD_LUA = """
local p, chunk, size, blob = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local first = tonumber(redis.call('GET', p .. ':seq') or '0')
local seq, j = first, 0
local pieces, counts, out = {}, {}, {}
local withdrawn, restored = redis.call('EXISTS', p .. ':w') == 1, 0
for i = 5, #ARGV, 7 do
    j = j + 1
    out[j] = 0
    if withdrawn then
        for k = 5, 6 do
            if ARGV[i + k] ~= '' then
                restored = restored + redis.call('SREM', p .. ':w', ARGV[i + k])
            end
        end
    end
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
if restored > 0 then
    redis.call('INCR', p .. ':wv')
end
out[j + 1] = restored
return out
"""

# KEYS: the withdrawn set, its version counter, then optionally an index key; ARGV: that index's field (only
# with the key: nothing is withdrawn unless the bank holds it), then the members. Returns how many of them
# were not withdrawn yet.
_WITHDRAW_LUA = """
local n, from = 0, 1
if #KEYS > 2 then
    if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
        return 0
    end
    from = 2
end
for i = from, #ARGV do
    n = n + redis.call('SADD', KEYS[1], ARGV[i])
end
if n > 0 then
    redis.call('INCR', KEYS[2])
end
return n
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
        self._client = connect(settings.redis, url=self._url)
        self._create_bank = self._client.register_script(_CREATE_BANK_LUA)
        self._add_script = self._client.register_script(_ADD_LUA)
        self._withdraw_script = self._client.register_script(_WITHDRAW_LUA)
        self._banks: dict[str, tuple[int, Label]] = {}
        self._by_id: dict[int, tuple[str, Label]] = {}
        self._ranks: dict[tuple[int, ...], np.ndarray] = {}
        self._index = NearIndex.empty()
        # bank id -> (withdrawn SHA-256s, withdrawn PDQs), as of ``{p}:wv`` = _withdrawn_version.
        self._withdrawn: dict[int, tuple[set[bytes], set[bytes]]] = {}
        self._withdrawn_version = 0
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
        # The withdrawn set is asked in the same round trip, not taken from the last refresh: a withdrawal
        # (a reversed review decision) stops exact answers in every worker at once.
        pipe = self._client.pipeline(transaction=False)
        pipe.hmget(self._bucket("x", sha256), [digest + bank.to_bytes(2, "big") for _, bank, _ in known])
        pipe.smismember(self._key("w"), [_member(bank, _SIGNAL_SHA, digest) for _, bank, _ in known])
        found, withdrawn = pipe.execute()
        for (name, _, label), value, gone in zip(known, found, withdrawn, strict=True):
            if value is not None and not gone:
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
        """Bank entries in batches; returns how many were new. Adding withdrawn content again to the same
        bank restores it (its SHA-256 and PDQ are no longer withdrawn there)."""
        added = restored = 0
        with self._errors("add"):
            batch: list[BankEntry] = []
            for entry in entries:
                batch.append(entry)
                if len(batch) == _ADD_BATCH:
                    added, restored = _plus((added, restored), self._add_batch(batch))
                    batch = []
            if batch:
                added, restored = _plus((added, restored), self._add_batch(batch))
        if (added or restored) and self._index_live:
            self.refresh()
        return added

    def _add_batch(self, batch: list[BankEntry]) -> tuple[int, int]:
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
            args += [key, field, entry.note or "", entry.source or "", bank,
                     _member(bank, _SIGNAL_SHA, sha) if entry.sha256 else "",
                     _member(bank, _SIGNAL_PDQ, pdq) if entry.pdq else ""]
        head: list[bytes | str | int] = [self._prefix, CHUNK_RECORDS, RECORD.itemsize, b"".join(records)]
        *new, restored = self._add_script(keys=[], args=head + args)
        return sum(new), int(restored)

    # -- withdrawing -------------------------------------------------------------------------------

    def withdraw(self, bank: str, sha256: str | None = None, pdq: PerceptualHash | str | None = None,
                 if_banked: bool = False) -> int:
        """Take content out of ``bank``: by its SHA-256 (no exact match, and no near match through the
        entries banked with that SHA-256) and/or by a PDQ hash (no near match through the entries banked
        with that hash; the exact match of a SHA-256 banked with it stays unless the SHA-256 is given too).
        Every process stops answering with it at once for exact matches and on its next refresh for near
        ones (this one at once); export and `entries_between` leave it out. Adding the content to the bank
        again restores it. Returns how many of the signals were not withdrawn yet. With ``if_banked``
        nothing is withdrawn unless the bank holds this SHA-256 (without one: this PDQ banked alone), in the
        same script: content the bank never held leaves no trace.

        Cost, on purpose: nothing is deleted (entries are append-only, and a withdrawal must be undoable);
        each withdrawn signal is one 35-byte member of ``{p}:w`` in Redis and, in every worker, one set
        entry plus 8 bytes per masked index row. Banks without withdrawals store and hold nothing more."""
        if sha256 is None and pdq is None:
            raise ValueError("withdraw what: give a SHA-256, a PDQ hash, or both")
        pdqs = [] if pdq is None else [pdq if isinstance(pdq, str) else pdq.bits.hex()]
        return self.withdraw_many(bank, [] if sha256 is None else [sha256], pdqs, if_banked=if_banked)

    def withdraw_many(self, bank: str, sha256s: Iterable[str], pdqs: Iterable[str], if_banked: bool = False) -> int:
        """`withdraw` for many SHA-256s and PDQs (64 hex digits each) of one bank (``if_banked``: of one
        item, the first SHA-256 or else the first PDQ deciding)."""
        signals = [(_SIGNAL_SHA, bytes.fromhex(check_sha256(s))) for s in sha256s]
        signals += [(_SIGNAL_PDQ, _pdq_bytes(p)) for p in pdqs]
        if not signals:
            return 0
        with self._errors("withdraw"):
            if bank not in self._banks:
                self._load_banks()
            if bank not in self._banks:
                raise ValueError(f"no bank named {bank!r}")
            bank_id = self._banks[bank][0]
            members = [_member(bank_id, kind, digest) for kind, digest in signals]
            keys, head = [self._key("w"), self._key("wv")], []
            if if_banked:
                kind, digest = signals[0]
                keys.append(self._bucket("x" if kind == _SIGNAL_SHA else "p", digest.hex()))
                head = [digest + bank_id.to_bytes(2, "big")]
            withdrawn = 0
            for start in range(0, len(members), _ADD_BATCH):
                withdrawn += int(self._withdraw_script(keys=keys, args=head + members[start:start + _ADD_BATCH]))
        if withdrawn and self._index_live:
            self.refresh()
        return withdrawn

    def withdrawn(self, bank: str) -> tuple[set[str], set[str]]:
        """The SHA-256s and PDQs (hex) withdrawn from ``bank``, as Redis holds them now."""
        with self._errors("read"):
            self._load_banks()
            if bank not in self._banks:
                raise ValueError(f"no bank named {bank!r}")
            shas, pdqs = self._read_withdrawn()[1].get(self._banks[bank][0], (set(), set()))
        return {s.hex() for s in shas}, {p.hex() for p in pdqs}

    def _read_withdrawn(self) -> tuple[int, dict[int, tuple[set[bytes], set[bytes]]]]:
        """(version, bank id -> (SHA-256s, PDQs)) of the withdrawn set, read together."""
        pipe = self._client.pipeline(transaction=True)
        pipe.get(self._key("wv"))
        pipe.smembers(self._key("w"))
        version, members = pipe.execute()
        out: dict[int, tuple[set[bytes], set[bytes]]] = {}
        for member in members:
            shas, pdqs = out.setdefault(int.from_bytes(member[:2], "big"), (set(), set()))
            (shas if member[2:3] == _SIGNAL_SHA else pdqs).add(member[3:])
        return int(version or 0), out

    def _dead_rows(self, rows: Rows) -> np.ndarray | None:
        """Row numbers of ``rows`` withdrawn under the current withdrawn set: those of a bank with
        withdrawals whose SHA-256 or PDQ was withdrawn there. O(rows) per bank with withdrawals; run on
        a refresh that finds the set changed, and on new rows while anything is withdrawn."""
        if not self._withdrawn or not len(rows):
            return None
        dead: list[np.ndarray] = []
        for bank, (shas, pdqs) in self._withdrawn.items():
            ids = np.flatnonzero(rows.banks == bank)
            if not len(ids):
                continue
            hit = np.zeros(len(ids), dtype=bool)
            if shas:
                hit |= rows.has_sha[ids] & _isin(rows.shas[ids], shas)
            if pdqs:
                hit |= _isin(rows.bits(ids), pdqs)
            dead.append(ids[hit])
        found = np.concatenate(dead) if dead else np.empty(0, dtype=np.int64)
        return found if len(found) else None

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
        """Load entries added since the last refresh into the near index, and mask what was withdrawn (or
        unmask what was restored) since; returns how many entries were loaded."""
        with self._refresh_lock, self._errors("refresh"):
            self._load_banks()
            changed = int(self._client.get(self._key("wv")) or 0) != self._withdrawn_version
            # Kept aside until the new index is in place: a refresh that fails half way is redone whole.
            version, withdrawn = self._read_withdrawn() if changed else (self._withdrawn_version, self._withdrawn)
            seq = int(self._client.get(self._key("seq")) or 0)
            parts = [self._rows(records) for records in self._records(self._loaded, seq)]
            self._withdrawn = withdrawn  # _dead_rows reads it; only this (locked) refresh changes it
            index = self._index
            if parts:
                rows = Rows.concat(parts)
                index = index.with_rows(rows if changed else rows.with_dead(self._dead_rows(rows)))
            if changed:
                index = index.masked(self._dead_rows)
            self._index, self._withdrawn_version = index, version
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
        """Every entry of ``bank``, in the order they were added, less what was withdrawn."""
        for _, entry in self.entries_between(bank, 0, self.written()):
            yield entry

    def written(self) -> int:
        """Entries ever written, of every bank: entry ids are below it."""
        with self._errors("read"):
            return int(self._client.get(self._key("seq")) or 0)

    def entries_between(self, bank: str, start: int, stop: int) -> Iterator[tuple[int, BankEntry]]:
        """``(entry id, entry)`` of ``bank`` with ids in ``start..stop-1``, in id order. The ids of one bank
        are not contiguous (banks share one sequence), so a caller that resumes keeps the last id seen.
        Withdrawn signals are left out: an entry whose SHA-256 was withdrawn, or that had a withdrawn PDQ
        alone, is skipped; one whose PDQ alone was withdrawn comes without it (its SHA-256 still matches)."""
        with self._errors("read"):
            self._load_banks()
            if bank not in self._banks:
                raise ValueError(f"no bank named {bank!r}")
            bank_id, label = self._banks[bank]
            gone_shas, gone_pdqs = self._read_withdrawn()[1].get(bank_id, (set(), set()))
            for first, records in self._records(start, stop, with_ids=True):
                ids = np.flatnonzero(records["bank"] == bank_id)
                notes = self._texts("n", [first + int(i) for i in ids if records["flags"][i] & FLAG_NOTE])
                sources = self._texts("s", [first + int(i) for i in ids if records["flags"][i] & FLAG_SOURCE])
                for i in ids:
                    entry_id = first + int(i)
                    entry = _entry(records[i], bank, label, notes.get(entry_id), sources.get(entry_id))
                    if gone_shas or gone_pdqs:
                        entry = _without(entry, gone_shas, gone_pdqs)
                        if entry is None:
                            continue
                    yield entry_id, entry

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


def _without(entry: BankEntry, shas: set[bytes], pdqs: set[bytes]) -> BankEntry | None:
    """``entry`` less its withdrawn signals; None when nothing is left of it."""
    if entry.sha256 is not None and bytes.fromhex(entry.sha256) in shas:
        return None
    if entry.pdq is not None and entry.pdq.bits in pdqs:
        return None if entry.sha256 is None else dataclasses.replace(entry, pdq=None)
    return entry


def _member(bank: int, kind: bytes, digest: bytes) -> bytes:
    """A member of the withdrawn set: bank id, signal kind, the 32-byte SHA-256 or PDQ."""
    return bank.to_bytes(2, "big") + kind + digest


def _pdq_bytes(value: str) -> bytes:
    if not _HEX64.match(value):
        raise ValueError(f"a PDQ hash is 64 lowercase hex digits, not {value[:80]!r}")
    return bytes.fromhex(value)


def _isin(digests: np.ndarray, members: set[bytes]) -> np.ndarray:
    """Which rows of (k, 32) uint8 ``digests`` are in ``members``: their first 8 bytes narrow it down
    (vectorised), the few candidates are then compared whole."""
    prefixes = np.ascontiguousarray(digests[:, :8]).view(">u8").ravel().astype(np.uint64)
    wanted = np.array([int.from_bytes(m[:8], "big") for m in members], dtype=np.uint64)
    out = np.zeros(len(digests), dtype=bool)
    for row in np.flatnonzero(np.isin(prefixes, wanted)):
        out[row] = digests[row].tobytes() in members
    return out


def _plus(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


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
