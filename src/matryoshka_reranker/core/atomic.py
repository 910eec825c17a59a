"""Artifact files: atomic writes (a failed stage must leave the last good artifact in place), hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary folder beside ``path``; on success it replaces ``path``.

    On an exception the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Opens a temporary file beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    with atomic_file(path, encoding="utf-8") as handle:
        json.dump(obj, handle, indent=indent, sort_keys=False)
        handle.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, encoding="utf-8") as handle:
        handle.write(text)


_HASHES: dict[tuple, str] = {}  # (device, inode, size, mtime) -> sha256: hard-linked weights hash once


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (``hashlib.file_digest``), cached per (inode, size, mtime): an export's
    shared weights file, hard-linked into every exit folder, is read once."""
    stat = os.stat(path)
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        with open(path, "rb") as handle:
            _HASHES[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _HASHES[key]
