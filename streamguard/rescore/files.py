"""The image files a ``--data`` re-score reads: files, directories and globs as ``scan`` takes them, and the
datasets ``eval`` and ``train`` take (tar archives, CSV/JSONL manifests), read by the evaluation's reader.

A dataset's own labels are not used: the label a re-score compares with is the one the content was judged
with before (the dedupe cache) or the one a bank gave it. An image inside a tar archive stays a `Sample`
(read on demand from the archive); every other image is a `Path`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from streamguard.evaluation.datasets import (
    MANIFEST_NAMES,
    TAR_SUFFIXES,
    Sample,
    SampleReader,
    SampleReadError,
    load_samples,
)
from streamguard.scan_inputs import Missing, expand

DataItem = Path | Sample

_MANIFEST_SUFFIXES = (".csv", ".jsonl")


class DataUnreadable(Exception):
    """One file or archive member could not be read: a skip, not the end of the run."""


def item_name(item: DataItem) -> str:
    """A stable name: the path, or ``archive!member`` for an image inside a tar archive."""
    if isinstance(item, Path):
        return str(item)
    return item.path if item.member is None else f"{item.path}!{item.member}"


def items_digest(items: Sequence[DataItem]) -> str:
    """Part of a run's identity: an item added or removed shifts every position after it."""
    return hashlib.sha256("\n".join(map(item_name, items)).encode()).hexdigest()[:16]


def is_dataset(path: Path) -> bool:
    """A tar archive or a manifest (the file, or a directory holding ``manifest.csv|jsonl``)."""
    if path.is_dir():
        return any((path / name).is_file() for name in MANIFEST_NAMES)
    name = path.name.lower()
    return path.is_file() and (name.endswith(TAR_SUFFIXES) or name.endswith(_MANIFEST_SUFFIXES))


def expand_data(arguments: Iterable[str], stdin: TextIO) -> tuple[list[DataItem], list[str]]:
    """Every image the arguments name, once each, in name order; and the arguments that named nothing.
    Raises ValueError for a dataset that cannot be read."""
    found: dict[str, DataItem] = {}
    plain: list[str] = []
    for argument in arguments:
        path = Path(argument)
        if argument != "-" and is_dataset(path):
            for sample in load_samples([path]):
                item = _item(sample)
                found.setdefault(item_name(item), item)
        else:
            plain.append(argument)
    missing: list[str] = []
    for entry in expand(plain, stdin):
        if isinstance(entry, Missing):
            missing.append(entry.argument)
        else:
            resolved = entry.resolve()
            found.setdefault(str(resolved), resolved)
    return [found[name] for name in sorted(found)], missing


def _item(sample: Sample) -> DataItem:
    path = Path(sample.path).resolve()
    return path if sample.member is None else dataclasses.replace(sample, path=str(path))


class DataReader:
    """Bytes of data items; tar archives stay open and indexed between reads."""

    def __init__(self) -> None:
        self._samples = SampleReader()

    def read(self, item: DataItem) -> bytes:
        try:
            return item.read_bytes() if isinstance(item, Path) else self._samples.read(item)
        except OSError as exc:
            raise DataUnreadable(exc.strerror or str(exc)) from None
        except SampleReadError as exc:
            raise DataUnreadable(str(exc)) from None

    def close(self) -> None:
        self._samples.close()
