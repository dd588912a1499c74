"""Turn ``scan`` arguments (files, directories, globs, ``-``) into an ordered list of paths.

Directories are walked recursively for image file extensions; a file named explicitly is always taken,
whatever its name, so that a mislabelled file is reported rather than silently skipped.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".avif",
     ".heic", ".heif"}
)
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Missing:
    """An argument that named nothing."""

    argument: str


def expand(arguments: Iterable[str], stdin: TextIO) -> Iterator[Path | Missing]:
    seen: set[Path] = set()
    for arg in arguments:
        for item in _expand_one(arg, stdin):
            if isinstance(item, Path):
                if item in seen:
                    continue
                seen.add(item)
            yield item


def _expand_one(arg: str, stdin: TextIO) -> Iterator[Path | Missing]:
    if arg == "-":
        for line in stdin:
            line = line.strip()
            if line:
                yield from _expand_one(line, stdin)
        return
    path = Path(arg)
    if path.is_dir():
        yield from _walk(path)
    elif path.exists():
        yield path
    elif _GLOB_CHARS & set(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            yield Missing(arg)
        for match in matches:
            p = Path(match)
            yield from (_walk(p) if p.is_dir() else [p])
    else:
        yield Missing(arg)


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath) / name
