"""A bank's content, in chunks, for an audit against the current models (`streamguard rescore --bank`).

A bank's label came from a person or an imported list, and the worker answers a match before any model
runs, so no model upgrade ever reaches it. The audit judges the banked images again and lets people see
where the models now say otherwise. Each banked item becomes a `Candidate` whose previous verdict is the
bank's label (``decided_by`` "bank"), so the re-judging is the same as for any other source.

Two ways to the images:

- `BankSource`: the bank's entries in id order, each fetched from the ``source`` it was banked with (the
  review request's URI). Entries without one (imported hashes) are counted ``no_image``, never fetched.
  The cursor runs over entry ids, which banks share: ``[next id, ids written when the run started)``.
- `BankFilesSource`: local image files (``--data``) matched to the bank exactly (SHA-256) or nearly (PDQ,
  under the banks' distance and quality rules); files the bank does not hold are counted ``not_in_bank``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import structlog

from streamguard.banks import BankEntry, BankMatch, BankStore
from streamguard.config import IntakeSettings, Settings
from streamguard.dedupe.phash import PerceptualHash, perceptual_hash
from streamguard.errors import IntakeError
from streamguard.fetch import ImageFetcher
from streamguard.intake.decode import decode_image
from streamguard.rescore.files import DataItem, item_name
from streamguard.rescore.sources import ENTRIES_CURSOR, Banked, Candidate, Chunk, FileSource
from streamguard.schemas import MatchedBank, Verdict
from streamguard.tenants import DEFAULT_TENANT, Tenants

log = structlog.get_logger(__name__)

BANK_POLICY_VERSION = "bank"


def subscribing_tenant(settings: Settings, bank: str) -> str:
    """Whose policy decides the models' label: the default tenant when it matches the bank, else the first
    configured tenant that does (the bank answers that tenant's events), else the default."""
    tenants = Tenants(settings)
    if bank in tenants.resolve(None).banks:
        return DEFAULT_TENANT
    for name in settings.tenants:
        if bank in tenants.resolve(name).banks:
            return name
    return DEFAULT_TENANT


def bank_verdict(match: BankMatch, sha256: str, tenant: str) -> Verdict:
    """The bank's label as the previous verdict of ``sha256``. The event id names the banked content: a
    reviewer's decision on it is published under that id."""
    return Verdict(event_id=f"bank:{match.bank}:{sha256}", content_sha256=sha256, label=match.label,
                   probability=None, scores=[], policy_version=BANK_POLICY_VERSION, model_versions={},
                   tenant=tenant, decided_by="bank",
                   matched_bank=MatchedBank(bank=match.bank, kind=match.kind, distance=match.distance))


class BankSource:
    """A bank's entries, their images fetched by the URI each was banked with."""

    def __init__(self, store: BankStore, bank: str, cursor: list[int], tenant: str, fetcher: ImageFetcher) -> None:
        self._store = store
        self._bank = bank
        self._next, self._end = cursor
        self._tenant = tenant
        self._fetcher = fetcher
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rescore-fetch")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._fetcher.close()
        self._store.close()

    def chunks(self, size: int, limit: int | None) -> Iterator[Chunk]:
        entries = self._store.entries_between(self._bank, self._next, self._end)
        left = limit
        while (left is None or left > 0) and self._next < self._end:
            n = size if left is None else min(size, left)
            batch = list(islice(entries, n))
            # A short batch: no entry of the bank is left before the end, whatever ids other banks hold.
            self._next = self._end if len(batch) < n else batch[-1][0] + 1
            if left is not None:
                left -= len(batch)
            yield self._chunk(batch)

    def _chunk(self, batch: Sequence[tuple[int, BankEntry]]) -> Chunk:
        chunk = Chunk(candidates=[], cursors={ENTRIES_CURSOR: self._next}, read=len(batch))
        todo = []
        for entry_id, entry in batch:
            if entry.source is None:
                chunk.skipped["no_image"] += 1  # an imported hash: there is nothing to show the models
                continue
            todo.append((entry_id, entry, self._pool.submit(self._fetcher.fetch, entry.source)))
        for entry_id, entry, future in todo:
            try:
                data = future.result().data
            except Exception as exc:  # noqa: BLE001 - an unreachable URI is one skip, not the end of the run
                chunk.skipped["fetch_failed"] += 1
                log.warning("rescore.fetch_failed", bank=self._bank, entry=entry_id,
                            error=f"{type(exc).__name__}: {exc}")
                continue
            sha = hashlib.sha256(data).hexdigest()
            if entry.sha256 is not None and sha != entry.sha256:
                # The URI serves other bytes now: not the content that was banked.
                chunk.skipped["content_changed"] += 1
                log.warning("rescore.content_changed", bank=self._bank, entry=entry_id)
                continue
            match = BankMatch(bank=self._bank, label=entry.label, kind="exact", distance=0, content_sha256=sha)
            chunk.candidates.append(Candidate(bank_verdict(match, sha, self._tenant), data,
                                              Banked(uri=entry.source, path=None, pdq=entry.pdq)))
        return chunk


class BankFilesSource(FileSource):
    """Local image files, each matched to the bank; what matches is judged against the bank's label."""

    def __init__(self, items: Sequence[DataItem], cursor: list[int], store: BankStore, bank: str, tenant: str,
                 intake: IntakeSettings) -> None:
        super().__init__(items, cursor)
        self._store = store
        self._bank = bank
        self._tenant = tenant
        self._intake = intake

    def close(self) -> None:
        super().close()
        self._store.close()

    def _fill(self, chunk: Chunk, files: dict[str, tuple[DataItem, bytes]]) -> None:
        for sha, (item, data) in files.items():
            # Strict: with Redis down the chunk must stop unchecked, not pass its files as unbanked.
            match = self._store.match(sha, None, [self._bank], fail_open=False)
            pdq = self._pdq(data)  # for a near match, and for the reviewer's decision to bank
            if match is None and pdq is not None:
                match = self._store.match(sha, pdq, [self._bank], fail_open=False)
            if match is None:
                chunk.skipped["not_in_bank"] += 1
                continue
            chunk.candidates.append(Candidate(bank_verdict(match, sha, self._tenant), data,
                                              Banked(uri=None, path=item_name(item), pdq=pdq)))

    def _pdq(self, data: bytes) -> PerceptualHash | None:
        try:
            return perceptual_hash(decode_image(data, self._intake).rgb)
        except IntakeError:
            return None  # the models will say it does not decode
