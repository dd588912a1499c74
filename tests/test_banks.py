"""Hash banks against a real redis-server: exact and near matches, the distance and quality rules, bank
subscriptions, import/export in our CSV and the ThreatExchange/HMA formats, the CLI, and Redis missing or
going away. The near index's recall is checked against a linear scan."""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw
from redis import Redis

from streamguard.banks import BankEntry, BankMatch, BanksUnavailable, BankStore, open_banks
from streamguard.banks import index as index_module
from streamguard.banks.formats import ImportReport, read_signals, to_entries, write_entries
from streamguard.banks.index import NO_RANK, NearIndex, Rows, hash_words, probe_cells
from streamguard.cli import cli
from streamguard.cli.banks import content_hashes
from streamguard.config import IntakeSettings, Settings, load_settings
from streamguard.dedupe import PerceptualHash, hamming
from streamguard.dedupe.redis_store import band_probes
from streamguard.devstack import Service, free_port, start_redis

AI, REAL = "known-ai", "known-real"


# -- helpers ---------------------------------------------------------------------------------------


def make_settings(redis_url: str, prefix: str | None = None, **banks: Any) -> Settings:
    banks.setdefault("definitions", {AI: "ai_generated", REAL: "real"})
    banks.setdefault("refresh_interval_s", 0)
    return load_settings(redis={"url": redis_url, "socket_timeout_s": 0.5, "retry_interval_s": 0.5},
                         banks={"key_prefix": prefix or f"t{uuid.uuid4().hex[:12]}", **banks})


def redis_url(service: Service) -> str:
    return f"redis://127.0.0.1:{service.port}/0"


@pytest.fixture
def settings_for(redis_service: Service) -> Iterator[Any]:
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


@pytest.fixture
def store(settings_for: Any) -> BankStore:
    return settings_for()[1]


def sha(tag: object) -> str:
    return hashlib.sha256(str(tag).encode()).hexdigest()


def random_hash(seed: int, quality: int = 90) -> PerceptualHash:
    return PerceptualHash(bits=np.random.default_rng(seed).integers(0, 256, 32, dtype=np.uint8).tobytes(),
                          quality=quality)


def flip(phash: PerceptualHash, positions: list[int] | range, quality: int | None = None) -> PerceptualHash:
    value = int.from_bytes(phash.bits, "big")
    for pos in positions:
        value ^= 1 << pos
    return PerceptualHash(bits=value.to_bytes(32, "big"), quality=phash.quality if quality is None else quality)


def scene(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """Photo-like: colour gradients, solid shapes, light noise (PDQ quality well above 50)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 100 * np.sin(x / w * np.pi * rng.uniform(1, 3) + phase[c]) * np.cos(y / h * np.pi * 2)
                for c in range(3)]
    img = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0, side = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40)), int(rng.integers(20, 90))
        draw.rectangle([x0, y0, x0 + side, y0 + side], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 90, scale: float = 1.0) -> bytes:
    if scale != 1.0:
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# -- the interface and opening ---------------------------------------------------------------------


def test_no_definitions_means_no_banks(redis_service: Service) -> None:
    assert open_banks(make_settings(redis_url(redis_service), definitions={})) is None


def test_exact_hit_names_the_bank_and_label_and_misses_other_content(store: BankStore) -> None:
    store.add(AI, "ai_generated", sha("gen-1"), None)
    store.add(REAL, "real", sha("photo-1"), None)
    assert store.match(sha("gen-1"), None, [AI, REAL]) == BankMatch(AI, "ai_generated", "exact", 0, sha("gen-1"))
    assert store.match(sha("photo-1"), None, [AI, REAL]) == BankMatch(REAL, "real", "exact", 0, sha("photo-1"))
    assert store.match(sha("other"), None, [AI, REAL]) is None


def test_only_subscribed_banks_match_and_the_earlier_bank_wins(store: BankStore) -> None:
    phash = random_hash(1)
    store.add(AI, "ai_generated", sha("both"), phash)
    store.add(REAL, "real", sha("both"), phash)
    store.add(AI, "ai_generated", sha("ai-only"), random_hash(2))

    assert store.match(sha("ai-only"), None, [REAL]) is None
    assert store.match(sha("both"), None, [REAL, AI]).bank == REAL  # type: ignore[union-attr]
    assert store.match(sha("both"), None, [AI, REAL]).bank == AI  # type: ignore[union-attr]
    near = flip(phash, range(0, 40, 4))
    assert store.match(sha("query"), near, [REAL, AI]).bank == REAL  # type: ignore[union-attr]
    assert store.match(sha("query"), flip(random_hash(2), [3]), [REAL]) is None
    # A bank nobody has written to, or that does not exist, matches nothing rather than failing.
    assert store.match(sha("both"), phash, ["never-written"]) is None


def test_adding_the_same_content_twice_changes_nothing(store: BankStore) -> None:
    for _ in range(2):
        store.add(AI, "ai_generated", sha("dup"), random_hash(3), note="first")
    assert [info.entries for info in store.banks() if info.name == AI] == [1]
    assert len(list(store.entries(AI))) == 1
    assert store.add_many([BankEntry(AI, "ai_generated", None, random_hash(4))] * 3) == 1


def test_a_bank_keeps_its_label(store: BankStore, redis_service: Service) -> None:
    with pytest.raises(ValueError, match="holds ai_generated"):
        store.add(AI, "real", sha("x"), None)
    store.add("fresh", "real", sha("y"), None)
    with pytest.raises(ValueError, match="holds real"):
        store.add("fresh", "ai_generated", sha("z"), None)
    conflicting = make_settings(redis_url(redis_service), prefix=store._prefix, definitions={"fresh": "ai_generated"})
    with pytest.raises(ValueError, match="holds real content"):
        open_banks(conflicting)


# -- near matching: distance and quality -----------------------------------------------------------


def test_a_recompressed_copy_is_a_near_match_and_another_image_is_not(store: BankStore) -> None:
    intake = IntakeSettings()
    original = jpeg(scene(7))
    banked_sha, banked_pdq = content_hashes(original, intake)
    assert banked_pdq is not None and banked_pdq.quality >= 50
    store.add(AI, "ai_generated", banked_sha, banked_pdq)

    copy_sha, copy_pdq = content_hashes(jpeg(Image.open(io.BytesIO(original)), quality=70, scale=0.5), intake)
    found = store.match(copy_sha, copy_pdq, [AI])
    assert found is not None and found.kind == "near" and found.content_sha256 == banked_sha
    assert found.distance == hamming(banked_pdq, copy_pdq) <= 31

    other_sha, other_pdq = content_hashes(jpeg(scene(8)), intake)
    assert store.match(other_sha, other_pdq, [AI]) is None


@pytest.mark.parametrize("max_distance", [31, 10, 0])
def test_the_distance_threshold_is_inclusive(settings_for: Any, max_distance: int) -> None:
    _, store = settings_for(near_max_distance=max_distance)
    base = random_hash(10)
    store.add(AI, "ai_generated", sha("base"), base)
    # Spread across bands as evenly as possible: the hardest case for a banded index.
    spread = [band * 16 + (k // 16) for k, band in enumerate(i % 16 for i in range(max_distance + 1))]
    at_edge = flip(base, spread[:max_distance])
    beyond = flip(base, spread)
    assert hamming(base, at_edge) == max_distance and hamming(base, beyond) == max_distance + 1

    found = store.match(sha("q1"), at_edge, [AI])
    assert found is not None and found.distance == max_distance
    assert store.match(sha("q2"), beyond, [AI]) is None


def test_the_nearest_match_wins(store: BankStore) -> None:
    base = random_hash(11)
    store.add(REAL, "real", sha("far"), flip(base, range(0, 200, 10)))  # 20 bits away
    store.add(AI, "ai_generated", sha("near"), flip(base, range(1, 50, 10)))  # 5 bits away
    found = store.match(sha("q"), base, [REAL, AI])
    assert found is not None and (found.bank, found.distance, found.content_sha256) == (AI, 5, sha("near"))


def test_quality_rule_for_queries_and_banked_hashes(settings_for: Any) -> None:
    _, store = settings_for()
    good, poor = random_hash(20, quality=80), random_hash(21, quality=49)
    store.add(AI, "ai_generated", sha("good"), good)
    store.add(AI, "ai_generated", sha("poor"), poor)

    assert store.match(sha("q"), flip(good, [1], quality=50), [AI]) is not None
    assert store.match(sha("q"), flip(good, [1], quality=49), [AI]) is None  # a poor query is not near-matched
    assert store.match(sha("q"), flip(poor, [1], quality=90), [AI]) is None  # a poor hash is not near-banked
    assert store.match(sha("poor"), poor, [AI]).kind == "exact"  # type: ignore[union-attr]

    _, strict = settings_for(near_min_quality=90)
    strict.add(AI, "ai_generated", sha("good"), good)
    assert strict.match(sha("q"), flip(good, [1], quality=100), [AI]) is None


def test_the_dedupe_rules_are_the_default(redis_service: Service) -> None:
    settings = load_settings(dedupe={"near_max_distance": 12, "near_min_quality": 70},
                             redis={"url": redis_url(redis_service)}, banks={"definitions": {AI: "ai_generated"}})
    store = BankStore(settings)
    assert (store.max_distance, store.min_quality) == (12, 70)
    store.close()


# -- sharing Redis: freshness ----------------------------------------------------------------------


def test_other_writers_additions_are_seen(settings_for: Any, redis_service: Service) -> None:
    settings, reader = settings_for(refresh_interval_s=0.1)
    writer = BankStore(settings)
    try:
        base = random_hash(30)
        writer.add(AI, "ai_generated", sha("late"), base)
        assert reader.match(sha("late"), None, [AI]) is not None  # exact reads Redis: at once
        deadline = time.monotonic() + 10
        while reader.match(sha("q"), flip(base, [0, 100]), [AI]) is None:  # near: on the next refresh
            assert time.monotonic() < deadline, "the refresher never loaded the addition"
            time.sleep(0.05)
    finally:
        writer.close()


# -- the index itself ------------------------------------------------------------------------------


def test_probe_cells_are_the_dedupe_index_cells() -> None:
    phash = random_hash(40)
    for distance in (0, 15, 16, 31, 40):
        ours = sorted(probe_cells(hash_words(phash.bits)[0], distance).tolist())
        assert ours == sorted(band * 65536 + value for band, value in band_probes(phash, distance))


@pytest.mark.parametrize("max_distance", [31, 20])
def test_index_finds_exactly_what_a_linear_scan_finds(monkeypatch: pytest.MonkeyPatch, max_distance: int) -> None:
    rng = np.random.default_rng(max_distance)
    n = 3000
    bits = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    # Plant close relatives so that hits exist at every distance around the threshold.
    queries = []
    for i in range(200):
        q = bits[i].copy()
        for pos in rng.choice(256, size=int(rng.integers(0, max_distance + 6)), replace=False):
            q[pos // 8] ^= 1 << (7 - pos % 8)
        queries.append(q)
    rows = Rows(hash_words(bits), rng.integers(0, 3, n).astype(np.uint16), bits.copy(), np.ones(n, bool))
    # A small delta limit: the index is part built, part delta, and rebuilt once on the way.
    monkeypatch.setattr(index_module, "DELTA_MAX", 700)
    index = NearIndex.build(Rows(rows.words[:1000], rows.banks[:1000], rows.shas[:1000], rows.has_sha[:1000]))
    for start in range(1000, n, 400):
        index = index.with_rows(Rows(rows.words[start:start + 400], rows.banks[start:start + 400],
                                     rows.shas[start:start + 400], rows.has_sha[start:start + 400]))
    assert len(index.delta) and len(index.main) > 1000

    rank = np.full(65536, NO_RANK, dtype=np.int32)
    rank[[2, 0]] = [0, 1]  # banks 2 then 0; bank 1 unsubscribed
    all_words = hash_words(bits)
    hits = 0
    for q in queries:
        distances = index_module._POPCOUNT16[all_words ^ hash_words(q.tobytes())[0]].sum(axis=1)
        eligible = (distances <= max_distance) & (rank[rows.banks] < NO_RANK)
        found = index.nearest(q.tobytes(), max_distance, rank)
        if not eligible.any():
            assert found is None
            continue
        hits += 1
        best = min(zip(distances[eligible], rank[rows.banks][eligible], strict=True))
        assert found is not None and (found.distance, rank[found.bank]) == best
    assert hits > 100


# -- import and export -----------------------------------------------------------------------------


def fill(store: BankStore) -> None:
    store.add(AI, "ai_generated", sha("a1"), random_hash(50), note="from the generator's gallery, row 1")
    store.add(AI, "ai_generated", sha("a2"), None, source="https://images.example/a2.png")
    store.add(AI, "ai_generated", sha("a3"), random_hash(51, quality=30), note='has "quotes", commas')
    store.add_many([BankEntry(AI, "ai_generated", None, random_hash(52))])


def export(store: BankStore, bank: str, fmt: str) -> str:
    out = io.StringIO()
    write_entries(out, fmt, store.entries(bank), store.min_quality)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["csv", "te-csv", "te-lines"])
def test_export_import_round_trip(settings_for: Any, fmt: str) -> None:
    _, source = settings_for()
    fill(source)
    exported = export(source, AI, fmt)
    # 3 SHA-256 rows and 2 PDQ rows: the quality-30 PDQ is not shared, as ThreatExchange would not.
    assert exported.count("sha256") == 3 and exported.count("pdq") == 2

    _, target = settings_for()
    report = ImportReport()
    signals = read_signals(io.StringIO(exported), fmt, report, bank=AI)  # type: ignore[arg-type]
    report.added = target.add_many(to_entries(signals, lambda bank: "ai_generated", 100, report))
    assert (report.read, report.added, report.skipped) == (5, 5, {})
    assert export(target, AI, fmt) == exported

    # What was banked matches in the new store too (the PDQ alone now, without its content's SHA-256).
    assert target.match(sha("a2"), None, [AI]).kind == "exact"  # type: ignore[union-attr]
    near = target.match(sha("q"), flip(random_hash(50), [5]), [AI])
    assert near is not None and (near.kind, near.distance, near.content_sha256) == ("near", 1, "")


def test_import_reads_threatexchange_csv_and_hma_signal_lists() -> None:
    pdq = random_hash(60).bits.hex()
    te_csv = ("collab,signal_type,signal_str,category,tags\n"
              f"{AI},pdq,{pdq},TRUE_POSITIVE,gen sd15\n"
              f"{AI},video_md5,{'0' * 32},TRUE_POSITIVE,\n"
              f"{AI},pdq,{'f' * 64},FALSE_POSITIVE,\n"
              f"{REAL},video_sha256,{sha('v').upper()},TRUE_POSITIVE,\n")
    report = ImportReport()
    signals = list(read_signals(io.StringIO(te_csv), "te-csv", report))
    assert [(s.bank, s.kind, s.value, s.note) for s in signals] == [
        (AI, "pdq", pdq, "gen sd15"), (REAL, "sha256", sha("v"), None)]
    assert report.read == 4 and report.skipped == {"signal type video_md5": 1, "false positive": 1}

    report = ImportReport()
    lines = f"# HMA local file\npdq {pdq}\n\nsha256 {sha('w')}\n"
    assert [s.kind for s in read_signals(io.StringIO(lines), "te-lines", report, bank=AI)] == ["pdq", "sha256"]
    bare = read_signals(io.StringIO(f"{pdq}\n"), "te-lines", ImportReport(), bank=AI, signal_type="pdq")
    assert [s.value for s in bare] == [pdq]


def test_entries_keep_their_image_source_and_only_those_pay_for_it(settings_for: Any,
                                                                   redis_service: Service) -> None:
    settings, store = settings_for()
    uri = "https://images.example/reviewed.png"
    store.add(AI, "ai_generated", sha("with"), random_hash(60), source=uri)
    store.add(AI, "ai_generated", sha("without"), random_hash(61))
    store.add(REAL, "real", sha("other bank"), None)
    store.add(AI, "ai_generated", sha("with"), None, source="https://elsewhere.example/")  # already banked
    assert {e.sha256: e.source for e in store.entries(AI)} == {sha("with"): uri, sha("without"): None}
    # Read from any id on, as a resumed audit does; ids are shared by every bank.
    ids = [entry_id for entry_id, _ in store.entries_between(AI, 0, store.written())]
    assert ids == [0, 1] and store.written() == 3
    assert [e.sha256 for _, e in store.entries_between(AI, 1, 3)] == [sha("without")]
    assert list(store.entries_between(AI, 2, 3)) == []
    # An entry without a source costs nothing more than before: no field, the record stays 68 bytes.
    client = Redis.from_url(redis_url(redis_service))
    try:
        keys = client.keys(f"{settings.banks.key_prefix}:s:*")
        assert len(keys) == 1 and client.hgetall(keys[0]) == {b"0": uri.encode()}
        assert client.strlen(f"{settings.banks.key_prefix}:r:0") == 3 * 68
    finally:
        client.close()

    # Our CSV carries it both ways; a CSV without the column still imports.
    exported = export(store, AI, "csv")
    assert exported.splitlines()[0] == "signal_type,signal,label,note,source" and uri in exported
    signals = read_signals(io.StringIO(exported), "csv", ImportReport(), bank=AI)
    entries = list(to_entries(signals, lambda bank: "ai_generated", 100, ImportReport()))
    assert {e.source for e in entries if e.sha256 == sha("with")} == {uri}
    old = f"signal_type,signal,label,note\nsha256,{sha(1)},ai_generated,\n"
    (entry,) = to_entries(read_signals(io.StringIO(old), "csv", ImportReport(), bank=AI),
                          lambda bank: "ai_generated", 100, ImportReport())
    assert entry.source is None


def test_import_refuses_bad_rows_naming_the_line() -> None:
    header = "signal_type,signal,label,note\n"
    bad_hex = header + f"sha256,{sha(1)},ai_generated,\npdq,zz{'0' * 62},ai_generated,\n"
    with pytest.raises(ValueError, match="line 3"):
        list(read_signals(io.StringIO(bad_hex), "csv", ImportReport(), bank=AI))
    wrong_label = header + f"sha256,{sha(1)},real,\n"
    signals = read_signals(io.StringIO(wrong_label), "csv", ImportReport(), bank=AI)
    with pytest.raises(ValueError, match="line 2: label 'real'"):
        list(to_entries(signals, lambda bank: "ai_generated", 100, ImportReport()))
    with pytest.raises(ValueError, match="header lacks"):
        list(read_signals(io.StringIO("hash,label\n"), "csv", ImportReport(), bank=AI))


# -- the CLI ---------------------------------------------------------------------------------------


def run_cli(settings: Settings, *args: str, input: str | None = None) -> Any:
    env = {"STREAMGUARD_REDIS__URL": settings.redis.url, "STREAMGUARD_BANKS__KEY_PREFIX": settings.banks.key_prefix,
           "STREAMGUARD_BANKS__DEFINITIONS": json.dumps(settings.banks.definitions), "STREAMGUARD_LOG__FORMAT": "json"}
    return CliRunner().invoke(cli, ["banks", *args], env=env, input=input, catch_exceptions=False)


def test_cli_add_list_export_import_match(settings_for: Any, tmp_path: Path) -> None:
    settings, _ = settings_for()
    banked, copy, other = tmp_path / "banked.jpg", tmp_path / "copy.jpg", tmp_path / "other.jpg"
    banked.write_bytes(jpeg(scene(70)))
    copy.write_bytes(jpeg(scene(70), quality=60, scale=0.5))
    other.write_bytes(jpeg(scene(71)))

    added = run_cli(settings, "add", AI, str(banked), "--note", "seen on a generator's showcase")
    assert added.exit_code == 0, added.output
    assert json.loads(added.output) == {"bank": AI, "label": "ai_generated", "given": 1, "added": 1}
    assert run_cli(settings, "add", "new-bank", "--sha256", sha(1)).exit_code == 1  # a new bank needs --label

    listed = json.loads(run_cli(settings, "list", "--json").output)
    assert {row["bank"]: row["entries"] for row in listed} == {AI: 1, REAL: 0}

    matched = [json.loads(line) for line in run_cli(settings, "match", str(banked), str(copy), str(other))
               .output.splitlines()]
    assert [m["match"] and (m["match"]["kind"], m["match"]["bank"]) for m in matched] == [
        ("exact", AI), ("near", AI), None]

    exported = run_cli(settings, "export", AI, "--format", "te-lines")
    assert exported.exit_code == 0
    signal_lines = [line for line in exported.stdout.splitlines() if line and not line.startswith("{")]
    assert [line.split()[0] for line in signal_lines] == ["sha256", "pdq"]
    imported = run_cli(settings, "import", "-", "--format", "te-lines", "--bank", REAL,
                       input="\n".join(signal_lines) + "\n")
    assert json.loads(imported.output) == {"read": 2, "added": 2, "skipped": {}}
    assert json.loads(run_cli(settings, "match", str(banked), "--bank", REAL).output)["match"]["bank"] == REAL


# -- Redis missing or going away -------------------------------------------------------------------


def test_unreachable_redis_is_a_clear_error_that_hides_the_password(tmp_path: Path) -> None:
    settings = make_settings(f"redis://app:hunter2@127.0.0.1:{free_port()}/0")
    with pytest.raises(BanksUnavailable) as caught:
        open_banks(settings)
    message = str(caught.value)
    assert "Redis at redis://app:**********@127.0.0.1" in message and "hunter2" not in message
    assert "ConnectionError" in message

    result = run_cli(settings, "list")
    assert result.exit_code == 1
    assert "banks: connect failed, Redis at redis://app:**********@" in result.output
    assert "hunter2" not in result.output and "Traceback" not in result.output


def test_matching_fails_open_when_redis_goes_away(tmp_path: Path) -> None:
    service = start_redis(tmp_path / "redis")
    try:
        store = open_banks(make_settings(redis_url(service)))
        assert store is not None
        base = random_hash(80)
        store.add(AI, "ai_generated", sha("gone"), base)
    finally:
        service.stop()
    try:
        # Exact lookups need Redis and now miss; the near index is in memory and still answers.
        started = time.monotonic()
        assert store.match(sha("gone"), None, [AI]) is None
        assert store.match(sha("gone"), None, [AI]) is None
        assert time.monotonic() - started < 1.5  # the second call skips Redis while it is down
        found = store.match(sha("gone"), base, [AI])
        assert found is not None and (found.kind, found.distance) == ("near", 0)
        with pytest.raises(BanksUnavailable, match="refresh failed"):
            store.refresh()
        # A bank audit asks strictly: "Redis is down" must not read as "not banked".
        with pytest.raises(BanksUnavailable, match="match failed"):
            store.match(sha("gone"), base, [AI], fail_open=False)
    finally:
        store.close()
