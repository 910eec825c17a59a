"""Artifact files: atomic writes (a failed stage must leave the last good artifact in place), hashes.

* A write goes to a temporary sibling (``.<name>.tmp-<pid>-<random>``) that is renamed onto the
  target only when complete, so readers see the old or the new artifact, never a mix.
* Concurrent writers of one folder each build their own temporary folder; the last to finish
  wins and neither loses the target or leaks its temporary folder.
* A temporary left by a killed process (its pid no longer runs) is removed at the next write.
* Written files and folders get the permissions the user's umask gives (``mkstemp``/``mkdtemp``
  alone would make them private: 0600/0700).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(path: Path) -> None:
    """Removes ``.<name>.tmp-<pid>-*`` / ``.old-`` siblings of ``path`` whose process is gone."""
    if not path.parent.is_dir():
        return
    for item in path.parent.iterdir():
        match = _TEMP_RE.match(item.name)
        if match and match["name"] == path.name and not _alive(int(match["pid"])):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary folder beside ``path``; on success it replaces ``path``.

    On an exception the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            os.replace(path, old)
        except FileNotFoundError:  # a concurrent writer moved it first
            old = None
    for attempt in range(100):  # a concurrent writer may put its folder there between our renames
        try:
            os.replace(tmp, path)
            break
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR) or attempt == 99:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            stale = path.parent / f".{path.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, stale)
                shutil.rmtree(stale, ignore_errors=True)
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
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
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


_HASHES: dict[tuple, str] = {}  # (device, inode, size, mtime) -> sha256: a file is hashed once per change


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (``hashlib.file_digest``), cached per (inode, size, mtime): a ratio's
    weights file, checked by export, evaluation, the gate and publish, is read once while unchanged."""
    stat = os.stat(path)
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        with open(path, "rb") as handle:
            _HASHES[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _HASHES[key]
