"""Publish local files and folders atomically: a reader sees the old content or the new, never half of either.

Every writer in the project goes through here: write under a temp name beside the target
(``{name}.tmp-{pid}-{random}``: unique per process and per call, so two writers never share one), fsync the
bytes, rename onto the target, fsync the folder so the rename itself survives a power cut. A crash leaves at
most a ``*.tmp-*`` file, which cleanup code recognises by that mark, and the target as it was.

Object stores have no rename; ``pipeline.shards.publishing`` is the equivalent for pyarrow filesystems and
uses this module for the local disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh sibling name for a write of ``path``: ``{path}.tmp-{pid}-{random}``."""
    final = Path(path)
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    fd = os.open(os.fspath(directory) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """fsync the finished temp file ``tmp``, rename it onto ``final``, fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path to write; it becomes ``path`` when the block ends without error, else is deleted.

    The parent folder is created. Use when a library insists on writing to a path (PIL, numpy, parquet).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        publish_file(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temp file beside ``path``, then publish it as ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def publish_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Replace the folder ``final`` by the finished folder ``tmp`` (same parent).

    Every file in ``tmp`` is fsynced first. An existing ``final`` is moved aside, ``tmp`` renamed into place,
    the parent fsynced, and only then the old folder deleted: at every moment ``final`` is either the complete
    old folder, the complete new one, or (between the two renames) absent.
    """
    tmp, final = Path(tmp), Path(final)
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_file(file)
    fsync_dir(tmp)
    old = None
    if final.exists():
        # hidden, like the temp folders callers build: a checkpoint listing must not take it for a checkpoint
        old = final.with_name(f".{final.name}{TMP_MARK}old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
