"""``streamguard banks``: import, export, add to, withdraw from, list and match against the hash banks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import click

from streamguard.banks import BankEntry, BanksUnavailable, BankStore, Label
from streamguard.banks.formats import FORMATS, Format, ImportReport, read_signals, to_entries, write_entries
from streamguard.cli.context import AppContext
from streamguard.config import IntakeSettings, Settings
from streamguard.dedupe.phash import PerceptualHash, from_hex, perceptual_hash
from streamguard.errors import IntakeError
from streamguard.intake.decode import decode_image

pass_app = click.make_pass_decorator(AppContext)

_format_option = click.option("--format", "fmt", type=click.Choice(FORMATS), default="csv", show_default=True,
                              help="csv: signal_type,signal,label,note; te-csv: `threatexchange dataset -P --csv`; "
                              "te-lines: `<signal_type> <signal>` lines (HMA's local-file signal list).")


@click.group("banks")
def banks_group() -> None:
    """Hash banks of known AI-generated and known-real content (banks.definitions, Redis)."""


@banks_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@pass_app
def list_command(app: AppContext, as_json: bool) -> None:
    """Every bank in Redis and every configured one, with its label and size."""
    with _store(app.settings) as store:
        infos = {info.name: info for info in store.banks()}
    rows = [{"bank": name, "label": info.label if info else label, "entries": info.entries if info else 0,
             "configured": name in app.settings.banks.definitions}
            for name in sorted(set(infos) | set(app.settings.banks.definitions))
            for info, label in [(infos.get(name), app.settings.banks.definitions.get(name))]]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'bank':<32} {'label':<13} {'entries':>10}  configured")
    for row in rows:
        click.echo(f"{row['bank']:<32} {row['label']:<13} {row['entries']:>10}  {'yes' if row['configured'] else 'no'}")


@banks_group.command("add")
@click.argument("bank")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--label", type=click.Choice(["ai_generated", "real"]), help="Needed for a bank that is neither "
              "configured nor in Redis yet.")
@click.option("--sha256", "sha256s", multiple=True, help="Bank this SHA-256 (hex) too.")
@click.option("--pdq", "pdqs", multiple=True, help="Bank this PDQ hash (64 hex) too.")
@click.option("--quality", type=click.IntRange(0, 100), default=100, show_default=True,
              help="PDQ quality recorded for --pdq hashes.")
@click.option("--note", help="Kept with every entry added.")
@pass_app
def add_command(app: AppContext, bank: str, paths: tuple[Path, ...], label: str | None, sha256s: tuple[str, ...],
                pdqs: tuple[str, ...], quality: int, note: str | None) -> None:
    """Bank image files (their SHA-256 and PDQ, as the worker computes them) or given hashes."""
    if not (paths or sha256s or pdqs):
        raise click.UsageError("nothing to add: give image files, --sha256 or --pdq")
    with _store(app.settings) as store:
        bank_label = _label_for(app.settings, store, label)(bank)
        entries: list[BankEntry] = []
        for path in paths:
            sha256, pdq = content_hashes(path.read_bytes(), app.settings.intake)
            entries.append(BankEntry(bank, bank_label, sha256=sha256, pdq=pdq, note=note))
        entries += [BankEntry(bank, bank_label, sha256=sha.strip().lower(), pdq=None, note=note) for sha in sha256s]
        entries += [BankEntry(bank, bank_label, sha256=None, pdq=from_hex(p.strip().lower(), quality), note=note)
                    for p in pdqs]
        added = store.add_many(entries)
    click.echo(json.dumps({"bank": bank, "label": bank_label, "given": len(entries), "added": added}))


@banks_group.command("import")
@click.argument("source", type=click.File("r", encoding="utf-8"))
@_format_option
@click.option("--bank", help="The bank to fill (te-csv: default, each row's collab).")
@click.option("--label", type=click.Choice(["ai_generated", "real"]), help="Needed for a bank that is neither "
              "configured nor in Redis yet.")
@click.option("--signal-type", help="te-lines: every line is a bare signal of this type (pdq, sha256).")
@click.option("--quality", type=click.IntRange(0, 100), default=100, show_default=True,
              help="PDQ quality recorded for imported hashes, which carry none.")
@pass_app
def import_command(app: AppContext, source: TextIO, fmt: Format, bank: str | None, label: str | None,
                   signal_type: str | None, quality: int) -> None:
    """Add the signals of SOURCE (a file, or - for stdin) to a bank; adding what is there changes nothing."""
    report = ImportReport()
    with _store(app.settings) as store:
        signals = read_signals(source, fmt, report, bank=bank, signal_type=signal_type)
        report.added = store.add_many(to_entries(signals, _label_for(app.settings, store, label), quality, report))
    click.echo(json.dumps(dataclasses.asdict(report)))


@banks_group.command("withdraw")
@click.option("--bank", help="The bank to withdraw from (te-csv files: default, each row's collab).")
@click.option("--sha256", "sha256s", multiple=True, help="Withdraw this content SHA-256 (hex): no exact match, "
              "nor a near one through the entries banked with it.")
@click.option("--pdq", "pdqs", multiple=True, help="Withdraw this PDQ hash (64 hex): no near match through it.")
@click.option("--from", "source", type=click.File("r", encoding="utf-8"), help="Withdraw the signals of this "
              "file (- for stdin), in an import format.")
@_format_option
@click.option("--signal-type", help="te-lines: every line is a bare signal of this type (pdq, sha256).")
@pass_app
def withdraw_command(app: AppContext, bank: str | None, sha256s: tuple[str, ...], pdqs: tuple[str, ...],
                     source: TextIO | None, fmt: Format, signal_type: str | None) -> None:
    """Withdraw content from a bank: workers stop matching it (exact at once, near within
    banks.refresh_interval_s) and export leaves it out. Adding it to the bank again restores it."""
    if not (sha256s or pdqs or source):
        raise click.UsageError("nothing to withdraw: give --sha256, --pdq or --from FILE")
    if (sha256s or pdqs) and bank is None:
        raise click.UsageError("--sha256 and --pdq need --bank")
    report = ImportReport()
    wanted: dict[str, tuple[list[str], list[str]]] = {}
    if bank is not None and (sha256s or pdqs):
        report.read += len(sha256s) + len(pdqs)
        wanted[bank] = ([s.strip().lower() for s in sha256s], [p.strip().lower() for p in pdqs])
    with _store(app.settings) as store:
        if source is not None:
            for signal in read_signals(source, fmt, report, bank=bank, signal_type=signal_type):
                shas, hashes = wanted.setdefault(signal.bank, ([], []))
                (shas if signal.kind == "sha256" else hashes).append(signal.value)
        banks = {}
        for name, (shas, hashes) in wanted.items():
            withdrawn = store.withdraw_many(name, shas, hashes)
            banks[name] = {"withdrawn": withdrawn, "already_withdrawn": len(shas) + len(hashes) - withdrawn}
    click.echo(json.dumps({"read": report.read, "withdrawn": sum(b["withdrawn"] for b in banks.values()),
                           "already_withdrawn": sum(b["already_withdrawn"] for b in banks.values()),
                           "skipped": report.skipped, "banks": banks}))


@banks_group.command("export")
@click.argument("bank")
@_format_option
@click.option("-o", "--output", type=click.File("w", encoding="utf-8"), default="-", help="Default: stdout.")
@pass_app
def export_command(app: AppContext, bank: str, fmt: Format, output: TextIO) -> None:
    """Write a bank's signals (PDQs under the quality rule are left out, as ThreatExchange does)."""
    with _store(app.settings) as store:
        counts = write_entries(output, fmt, store.entries(bank), store.min_quality)
    click.echo(json.dumps({"bank": bank, **counts}), err=True)


@banks_group.command("match")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--bank", "banks", multiple=True, help="Match against these banks, in this order (default: the "
              "configured ones, else every bank).")
@pass_app
def match_command(app: AppContext, paths: tuple[Path, ...], banks: tuple[str, ...]) -> None:
    """Match image files against the banks, as the worker does before any detector runs; a JSON line each."""
    with _store(app.settings) as store:
        store.refresh()
        names = list(banks) or list(app.settings.banks.definitions) or [info.name for info in store.banks()]
        for path in paths:
            sha256, pdq = content_hashes(path.read_bytes(), app.settings.intake)
            found = store.match(sha256, pdq, names)
            click.echo(json.dumps({"path": str(path), "sha256": sha256,
                                   "match": dataclasses.asdict(found) if found else None}))


def content_hashes(data: bytes, intake: IntakeSettings) -> tuple[str, PerceptualHash | None]:
    """SHA-256 of the bytes and the PDQ of the decoded image (None when it does not decode)."""
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        return sha256, perceptual_hash(decode_image(data, intake).rgb)
    except IntakeError:
        return sha256, None


def _label_for(settings: Settings, store: BankStore, given: str | None) -> Callable[[str], Label]:
    """Each bank's label: configured, else what Redis holds, else ``--label``; ``--label`` must agree."""
    held = {info.name: info.label for info in store.banks()}
    configured = settings.banks.definitions

    def label_for(bank: str) -> Label:
        label = configured.get(bank) or held.get(bank) or given
        if label is None:
            raise ValueError(f"bank {bank!r} is new: give --label, or define it in banks.definitions")
        if given is not None and given != label:
            raise ValueError(f"bank {bank!r} holds {label} content, not {given}")
        return label  # type: ignore[return-value]

    return label_for


@contextmanager
def _store(settings: Settings) -> Iterator[BankStore]:
    """A store for one command; Redis being unreachable and bad input end as one error line."""
    store = BankStore(settings)
    try:
        store.ping()
        yield store
    except (BanksUnavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()
        sys.stdout.flush()
