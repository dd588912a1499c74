"""Withdrawing content from a hash bank, against a real redis-server: exact and near matches stop (the next
best candidate answers), other workers follow on refresh, adding the content again restores it, export and
the audit walk leave it out, and banks without withdrawals store nothing more. The index's masking is
checked against a linear scan."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from redis import Redis

from streamguard.banks import BankEntry, BankStore, open_banks
from streamguard.banks import index as index_module
from streamguard.banks.index import NO_RANK, NearIndex, Rows, hash_words
from streamguard.config import Settings
from streamguard.devstack import Service
from test_banks import AI, REAL, export, flip, make_settings, random_hash, redis_url, run_cli, sha


@pytest.fixture
def stores(redis_service: Service) -> Iterator[Any]:
    """``stores(**banks)``: (settings, an open store) on a fresh key prefix, closed after the test."""
    opened: list[BankStore] = []

    def make(**banks: Any) -> tuple[Settings, BankStore]:
        settings = make_settings(redis_url(redis_service), **banks)
        store = open_banks(settings)
        assert store is not None
        opened.append(store)
        return settings, store

    yield make
    for store in opened:
        store.close()


def keys_of(service: Service, prefix: str) -> set[str]:
    client = Redis.from_url(redis_url(service))
    try:
        return {k.decode() for k in client.keys(f"{prefix}:*")}
    finally:
        client.close()


def test_withdrawing_a_sha256_stops_its_exact_and_near_matches_in_that_bank_only(stores: Any) -> None:
    _, store = stores()
    base = random_hash(100)
    store.add(AI, "ai_generated", sha("x"), base)
    store.add(AI, "ai_generated", sha("y"), flip(base, range(0, 60, 10)))  # 6 bits from x
    store.add(REAL, "real", sha("z"), flip(base, [100, 110, 120]))  # 3 bits from x
    store.add(REAL, "real", sha("x"), None)  # the same content, exactly, in the other bank
    query = flip(base, [1])
    assert store.match(sha("q"), query, [AI, REAL]) == store.match(sha("q"), query, [AI])
    assert store.match(sha("q"), query, [AI]).content_sha256 == sha("x")  # type: ignore[union-attr]

    assert store.withdraw(AI, sha256=sha("x")) == 1
    assert store.withdraw(AI, sha256=sha("x")) == 0  # already withdrawn
    assert store.withdrawn(AI) == ({sha("x")}, set()) and store.withdrawn(REAL) == (set(), set())

    assert store.match(sha("x"), None, [AI]) is None
    exact = store.match(sha("x"), None, [AI, REAL])
    assert exact is not None and (exact.bank, exact.kind) == (REAL, "exact")
    # Near: x never answers again from AI; the next best does, in the same bank or another.
    near = store.match(sha("q"), query, [AI])
    assert near is not None and (near.content_sha256, near.distance) == (sha("y"), 7)
    near = store.match(sha("q"), query, [AI, REAL])
    assert near is not None and (near.bank, near.content_sha256, near.distance) == (REAL, sha("z"), 4)
    near = store.match(sha("q"), base, [AI])  # x's own PDQ
    assert near is not None and near.content_sha256 == sha("y")


def test_withdrawing_a_pdq(stores: Any) -> None:
    _, store = stores()
    alone, banked_with_sha = random_hash(110), random_hash(111)
    store.add_many([BankEntry(AI, "ai_generated", None, alone)])  # an imported signal: a PDQ alone
    store.add(AI, "ai_generated", sha("both"), banked_with_sha)
    assert store.withdraw(AI, pdq=alone.bits.hex()) == 1
    assert store.withdraw(AI, pdq=banked_with_sha) == 1
    assert store.match(sha("q"), flip(alone, [3]), [AI]) is None
    assert store.match(sha("q"), flip(banked_with_sha, [3]), [AI]) is None
    # The SHA-256 banked with that PDQ was not withdrawn: it still matches, and exports without the PDQ.
    assert store.match(sha("both"), None, [AI]).kind == "exact"  # type: ignore[union-attr]
    assert [(e.sha256, e.pdq) for e in store.entries(AI)] == [(sha("both"), None)]
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.withdraw(AI, pdq="12ab")
    with pytest.raises(ValueError, match="no bank named"):
        store.withdraw("nobody", sha256=sha(1))


def test_another_worker_follows_a_withdrawal_and_a_restore(stores: Any) -> None:
    settings, reader = stores(refresh_interval_s=0.1)
    writer = BankStore(settings)  # another process: its index is not live, its withdrawals reach others
    try:
        base = random_hash(120)
        near = flip(base, [0, 100])
        writer.add(AI, "ai_generated", sha("c"), base)
        wait_for(lambda: reader.match(sha("q"), near, [AI]) is not None, "the addition")

        assert writer.withdraw(AI, sha256=sha("c"), pdq=base) == 2
        assert reader.match(sha("c"), None, [AI]) is None  # exact: at once, Redis answers it
        wait_for(lambda: reader.match(sha("q"), near, [AI]) is None, "the withdrawal")

        writer.add(AI, "ai_generated", sha("c"), base)  # a decision reversed again: restored
        assert reader.match(sha("c"), None, [AI]) is not None
        wait_for(lambda: reader.match(sha("q"), near, [AI]) is not None, "the restore")
        assert writer.written() == 1  # restored, not banked twice
    finally:
        writer.close()


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"the refresher never loaded {what}"
        time.sleep(0.05)


def test_withdraw_then_add_again_matches_again_in_this_process(stores: Any) -> None:
    _, store = stores()
    base = random_hash(130)
    store.add(AI, "ai_generated", sha("r"), base)
    store.withdraw(AI, sha256=sha("r"), pdq=base)
    assert store.match(sha("r"), base, [AI]) is None
    assert store.add_many([BankEntry(AI, "ai_generated", sha("r"), base)]) == 0  # not new: restored
    assert store.withdrawn(AI) == (set(), set())
    found = store.match(sha("r"), None, [AI])
    assert found is not None and found.kind == "exact"
    found = store.match(sha("q"), flip(base, [7]), [AI])
    assert found is not None and (found.kind, found.content_sha256) == ("near", sha("r"))
    assert store.index.main.dead is None and store.index.delta.dead is None  # nothing left masked


def test_export_and_the_audit_walk_leave_withdrawn_entries_out_and_unwithdrawn_banks_pay_nothing(
        stores: Any, redis_service: Service) -> None:
    settings, store = stores()
    prefix = settings.banks.key_prefix
    store.add(AI, "ai_generated", sha("keep"), random_hash(140), source="https://images.example/keep.png")
    store.add(AI, "ai_generated", sha("drop"), random_hash(141), source="https://images.example/drop.png")
    store.add(REAL, "real", sha("other"), random_hash(142))
    before = keys_of(redis_service, prefix)
    assert not any(k.startswith((f"{prefix}:w", f"{prefix}:wv")) for k in before)
    assert store.index.main.dead is None and store.index.delta.dead is None  # no index bytes either

    store.withdraw(AI, sha256=sha("drop"))
    assert keys_of(redis_service, prefix) - before == {f"{prefix}:w", f"{prefix}:wv"}  # one set, one counter
    exported = export(store, AI, "csv")
    assert sha("keep") in exported and sha("drop") not in exported
    assert random_hash(141).bits.hex() not in exported
    assert [entry_id for entry_id, _ in store.entries_between(AI, 0, store.written())] == [0]
    assert [e.sha256 for e in store.entries(REAL)] == [sha("other")]
    # The index masks one row: 8 bytes, in the delta that holds it.
    dead = [rows.dead for rows in (store.index.main, store.index.delta) if rows.dead is not None]
    assert len(dead) == 1 and dead[0].nbytes == 8


def test_cli_withdraw(stores: Any) -> None:
    settings, store = stores()
    pdq_alone = random_hash(150)
    store.add(AI, "ai_generated", sha("a"), None)
    store.add(AI, "ai_generated", sha("b"), None)
    store.add_many([BankEntry(AI, "ai_generated", None, pdq_alone)])

    result = run_cli(settings, "withdraw", "--bank", AI, "--sha256", sha("a"), "--sha256", sha("a"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"read": 2, "withdrawn": 1, "already_withdrawn": 1, "skipped": {},
                                         "banks": {AI: {"withdrawn": 1, "already_withdrawn": 1}}}
    listed = f"sha256 {sha('b')}\npdq {pdq_alone.bits.hex()}\nmd5 {'0' * 32}\n"
    result = run_cli(settings, "withdraw", "--bank", AI, "--from", "-", "--format", "te-lines", input=listed)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["read"], summary["withdrawn"], summary["skipped"]) == (3, 2, {"signal type md5": 1})
    assert list(store.entries(AI)) == []
    assert store.match(sha("b"), None, [AI]) is None

    assert run_cli(settings, "withdraw", "--sha256", sha("a")).exit_code == 2  # which bank?
    assert run_cli(settings, "withdraw", "--bank", "nobody", "--sha256", sha("a")).exit_code == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_rows_never_answer_and_the_next_best_does(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, max_distance = 2000, 31
    bits = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    banks = rng.integers(0, 2, n).astype(np.uint16)
    dead = np.sort(rng.choice(n, size=n // 5, replace=False))
    queries = []
    for i in rng.choice(n, size=150, replace=False):  # close to banked rows, many of them masked
        q = bits[i].copy()
        for pos in rng.choice(256, size=int(rng.integers(0, 12)), replace=False):
            q[pos // 8] ^= 1 << (7 - pos % 8)
        queries.append(q)
    rows = Rows(hash_words(bits), banks, bits.copy(), np.ones(n, bool))
    monkeypatch.setattr(index_module, "DELTA_MAX", 500)
    is_dead = np.zeros(n, bool)
    is_dead[dead] = True

    def dead_of(part_start: int) -> Any:
        return lambda part: np.flatnonzero(is_dead[part_start:part_start + len(part)])

    # Masked on build, carried through a rebuild, and masked again on a part-built, part-delta index.
    index = NearIndex.build(Rows(rows.words[:800], rows.banks[:800], rows.shas[:800], rows.has_sha[:800])
                            .with_dead(dead[dead < 800]))
    for start in range(800, n, 400):
        part = Rows(rows.words[start:start + 400], rows.banks[start:start + 400], rows.shas[start:start + 400],
                    rows.has_sha[start:start + 400])
        index = index.with_rows(part.with_dead(dead_of(start)(part)))
    assert len(index.delta) and len(index.main) > 800
    remasked = index.masked(lambda part: dead_of(0 if part is index.main else len(index.main))(part))

    rank = np.zeros(65536, dtype=np.int32) + NO_RANK
    rank[[1, 0]] = [0, 1]
    all_words = hash_words(bits)
    masked_hits = 0
    for q in queries:
        distances = index_module._POPCOUNT16[all_words ^ hash_words(q.tobytes())[0]].sum(axis=1)
        eligible = (distances <= max_distance) & ~is_dead
        masked_hits += int((distances[is_dead] <= max_distance).any())
        for candidate in (index, remasked):
            found = candidate.nearest(q.tobytes(), max_distance, rank)
            if not eligible.any():
                assert found is None
                continue
            best = min(zip(distances[eligible], rank[banks][eligible], strict=True))
            assert found is not None and (found.distance, rank[found.bank]) == best
            assert found.sha256 in {bits[i].tobytes().hex() for i in np.flatnonzero(eligible)}
    assert masked_hits > 20


def test_if_banked_withdraws_only_content_the_bank_holds(stores: Any, redis_service: Service) -> None:
    settings, store = stores()
    base = random_hash(160)
    # A first review decision: the other bank never held the content, so nothing is written there.
    assert store.withdraw(REAL, sha("new"), base, if_banked=True) == 0
    assert f"{settings.banks.key_prefix}:w" not in keys_of(redis_service, settings.banks.key_prefix)
    store.add(REAL, "real", sha("new"), base)
    assert store.withdraw(REAL, sha("new"), base, if_banked=True) == 2
    assert store.match(sha("new"), base, [REAL]) is None
