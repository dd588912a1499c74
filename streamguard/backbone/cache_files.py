"""How a converted-weights cache is written: under a lock, staged beside it, fsynced, swapped in whole.

Shared by every backbone's cache (CLIP, DINOv2): a reader, or a second `backbone fetch`, sees the old cache
or the new one, never half of either, and a crash leaves at most a staging directory that is not a cache.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def cache_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """One converter at a time for cache ``name`` in ``cache_dir`` (across processes)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{name}.lock").open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A staging path beside ``path`` to write; on success it replaces ``path`` whole, readable by all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the cache unreadable to another service user
        fsync(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by the complete ``staging`` directory beside it."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.rename(target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    path.write_text(text)
    fsync(path)


def fsync(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
