"""Bank contents as files: our plain CSV and the two ThreatExchange/HMA signal-list formats.

- ``csv``: header ``signal_type,signal,label,note[,source]``, one signal a row; the bank is named on the
  command. ``source`` (optional on import, always written) is where the image can be fetched again.
- ``te-csv``: what python-threatexchange writes with ``threatexchange dataset -P --csv`` (header
  ``collab,signal_type,signal_str,category,tags``); the collaboration is the bank unless one is named.
  Rows whose category is ``FALSE_POSITIVE`` (contributors said it does not match) are skipped.
- ``te-lines``: the local-file signal list that pytx's ``LocalFileSignalExchangeAPI`` and so HMA read:
  ``<signal_type> <signal>`` a line, or bare signals when the type is given.

Signals are hex: ``pdq`` 64 digits (`streamguard.dedupe.phash.to_hex`), ``sha256`` 64. ThreatExchange's only
SHA-256 type is ``video_sha256``; it is the same byte hash, so it (and ``photo_sha256``) import as
``sha256``. Other types (md5, tmk, url, ...) are skipped and counted. A PDQ hash travels without its quality
score, and pytx shares only hashes that pass PDQ's quality rule (`PdqSignal.hash_from_bytes` drops them),
so export writes only PDQs that pass ours, and import records the quality it is told (default 100).
One signal is one entry: content banked with both hashes exports as two rows and imports as two entries,
after which a near hit on it cannot name the content's SHA-256.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, TextIO

from streamguard.banks.model import LABELS, BankEntry, Label
from streamguard.dedupe.phash import from_hex

Format = Literal["csv", "te-csv", "te-lines"]
FORMATS: tuple[Format, ...] = ("csv", "te-csv", "te-lines")
SignalKind = Literal["sha256", "pdq"]

CSV_COLUMNS = ("signal_type", "signal", "label", "note")
CSV_SOURCE = "source"  # optional: files written before it existed still import
TE_CSV_COLUMNS = ("collab", "signal_type", "signal_str", "category", "tags")
_KINDS: dict[str, SignalKind] = {"sha256": "sha256", "photo_sha256": "sha256", "video_sha256": "sha256",
                                 "pdq": "pdq"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Signal:
    line: int
    bank: str
    kind: SignalKind
    value: str
    label: str | None
    note: str | None
    source: str | None = None


@dataclass
class ImportReport:
    read: int = 0
    added: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def read_signals(stream: TextIO, fmt: Format, report: ImportReport, bank: str | None = None,
                 signal_type: str | None = None) -> Iterator[Signal]:
    """Signals of a file, checked; a malformed row raises ValueError naming its line."""
    if fmt == "csv":
        rows = _csv_rows(stream, CSV_COLUMNS)
        for line, row in rows:
            if bank is None:
                raise ValueError("a plain CSV names no bank: say which (--bank)")
            yield from _signal(report, line, bank, row["signal_type"], row["signal"], row["label"] or None,
                               row["note"] or None, row.get(CSV_SOURCE) or None)
    elif fmt == "te-csv":
        for line, row in _csv_rows(stream, TE_CSV_COLUMNS):
            if row["category"].strip().upper() == "FALSE_POSITIVE":
                report.read += 1
                report.skip("false positive")
                continue
            yield from _signal(report, line, bank or row["collab"], row["signal_type"], row["signal_str"], None,
                               row["tags"] or None)
    else:
        if bank is None:
            raise ValueError("a signal list names no bank: say which (--bank)")
        for line, text in enumerate(stream, start=1):
            text = text.strip()
            if not text or text.startswith("#"):
                continue
            kind, _, value = text.partition(" ") if signal_type is None else (signal_type, "", text)
            yield from _signal(report, line, bank, kind, value.strip(), None, None)


def to_entries(signals: Iterable[Signal], label_for: Callable[[str], Label], quality: int,
               report: ImportReport) -> Iterator[BankEntry]:
    """Bank entries of the signals: each bank's content gets that bank's label, and a row that states
    another label is refused (it would put content in the wrong bank)."""
    for signal in signals:
        label = label_for(signal.bank)
        if signal.label is not None and signal.label != label:
            raise ValueError(f"line {signal.line}: label {signal.label!r}, but bank {signal.bank!r} holds {label}")
        if signal.kind == "sha256":
            yield BankEntry(signal.bank, label, sha256=signal.value, pdq=None, note=signal.note, source=signal.source)
        else:
            yield BankEntry(signal.bank, label, sha256=None, pdq=from_hex(signal.value, quality), note=signal.note,
                            source=signal.source)


def write_entries(stream: TextIO, fmt: Format, entries: Iterable[BankEntry], min_quality: int) -> dict[str, int]:
    """Write entries in ``fmt``; returns signals written and PDQs left out under the quality rule."""
    counts = {"signals": 0, "low_quality_pdq": 0}
    writer = None if fmt == "te-lines" else csv.writer(stream, lineterminator="\n")
    if writer is not None:
        writer.writerow((*CSV_COLUMNS, CSV_SOURCE) if fmt == "csv" else TE_CSV_COLUMNS)
    for entry in entries:
        signals: list[tuple[str, str]] = []
        if entry.sha256 is not None:
            signals.append(("sha256", entry.sha256))
        if entry.pdq is not None:
            if entry.pdq.quality >= min_quality:
                signals.append(("pdq", entry.pdq.bits.hex()))
            else:
                counts["low_quality_pdq"] += 1
        for kind, value in signals:
            if writer is None:
                stream.write(f"{kind} {value}\n")
            elif fmt == "csv":
                writer.writerow([kind, value, entry.label, entry.note or "", entry.source or ""])
            else:
                writer.writerow([entry.bank, kind, value, "TRUE_POSITIVE", entry.note or ""])
            counts["signals"] += 1
    return counts


def _csv_rows(stream: TextIO, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(stream)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"CSV header lacks {', '.join(missing)} (expected {','.join(columns)})")
    for row in reader:
        yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}


def _signal(report: ImportReport, line: int, bank: str, signal_type: str, value: str, label: str | None,
            note: str | None, source: str | None = None) -> Iterator[Signal]:
    report.read += 1
    kind = _KINDS.get(signal_type.strip().lower())
    if kind is None:
        report.skip(f"signal type {signal_type.strip() or '(none)'}")
        return
    value = value.strip().lower()
    if not _HEX64.match(value):
        raise ValueError(f"line {line}: a {kind} signal is 64 hex digits, not {value[:80]!r}")
    if label is not None and label not in LABELS:
        raise ValueError(f"line {line}: label is one of {', '.join(LABELS)}, not {label!r}")
    yield Signal(line=line, bank=bank, kind=kind, value=value, label=label, note=note, source=source)
