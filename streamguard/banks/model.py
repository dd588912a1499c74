"""What the banks hold and answer: entries, matches, bank summaries."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from streamguard.dedupe.phash import PerceptualHash

Label = Literal["ai_generated", "real"]
LABELS: tuple[Label, ...] = ("ai_generated", "real")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Bank names end up in Redis values and CSV cells: keep them to what reads the same everywhere.
_BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class BanksUnavailable(Exception):
    """The banks' Redis cannot be reached (or answers with an error); the message says which and why."""


@dataclass(frozen=True)
class BankMatch:
    """A bank hit. ``distance`` is 0 for ``exact``. ``content_sha256`` is the banked content's SHA-256: the
    query's own for an exact hit; for a near hit, that of the content the banked PDQ was taken from, or ""
    when the hash was banked without it (signal lists imported from HMA/ThreatExchange carry PDQs alone)."""

    bank: str
    label: Label
    kind: Literal["exact", "near"]
    distance: int
    content_sha256: str


@dataclass(frozen=True)
class BankEntry:
    """One banked item: content's SHA-256, its PDQ, or both (at least one). ``source``: where the image
    can be fetched again (the review request's URI), so that the models can judge banked content again
    (`streamguard rescore --bank`); imported signal lists carry none."""

    bank: str
    label: Label
    sha256: str | None
    pdq: PerceptualHash | None
    note: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        check_bank_name(self.bank)
        check_label(self.label)
        if self.sha256 is None and self.pdq is None:
            raise ValueError("a bank entry needs a SHA-256, a PDQ hash, or both")
        if self.sha256 is not None:
            check_sha256(self.sha256)
        if self.pdq is not None and not 0 <= self.pdq.quality <= 100:
            raise ValueError(f"PDQ quality is 0..100, not {self.pdq.quality}")


@dataclass(frozen=True)
class BankInfo:
    name: str
    label: Label
    entries: int


def check_sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError(f"not a lowercase hex SHA-256: {value!r}")
    return value


def check_bank_name(name: str) -> str:
    if not _BANK_NAME.match(name):
        raise ValueError(f"bank names are 1-128 of A-Z a-z 0-9 _ . - (starting alphanumeric), not {name!r}")
    return name


def check_label(label: str) -> Label:
    if label not in LABELS:
        raise ValueError(f"a bank label is one of {', '.join(LABELS)}, not {label!r}")
    return label  # type: ignore[return-value]
