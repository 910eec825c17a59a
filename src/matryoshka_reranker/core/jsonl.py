"""JSON Lines, read and written in one way everywhere (training data, eval candidates, pairs, shards)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from .atomic import atomic_file
from .errors import InputError


class JsonlError(InputError):
    """A JSONL file is malformed; the message names ``file:line``."""


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file", hint: str | None = None
               ) -> Iterator[tuple[str, object]]:
    """(``"file:line"``, decoded object) for each non-blank line (``.gz`` read as gzip); bad JSON names the line.

    ``what`` names the file in errors ("training file", "eval candidates"); ``hint`` says how to
    make a missing one.
    """
    import gzip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist" + (f": {hint}" if hint else ""))
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:  # bytes: a line that is not UTF-8 is named, not a bare codec error
        for number, raw in enumerate(_gzip_checked(handle, path), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise JsonlError(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonlError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if _SURROGATE.search(raw) and not is_valid_unicode(value):
                raise JsonlError(f"{path}:{number}: not valid Unicode (a lone surrogate escape), which no "
                                 "tokenizer or UTF-8 file takes")
            yield f"{path}:{number}", value


def _gzip_checked(handle, path: Path) -> Iterator[bytes]:
    """The lines of ``handle``; a ``.gz`` file cut short or not gzip at all is an error naming the file (it was
    a bare EOFError, which the CLI reports as just "Aborted.", or a BadGzipFile traceback)."""
    import gzip
    import zlib

    number = 0
    try:
        for number, raw in enumerate(handle, 1):
            yield raw
    except EOFError:
        raise JsonlError(f"{path}: the gzip file is cut short after line {number} (an interrupted download or "
                         "copy?)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise JsonlError(f"{path}: not a valid gzip file ({err}); a plain JSONL file must not end in .gz") from None


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \ud800-\udfff escape; a valid pair is two of them


def is_valid_unicode(value: object) -> bool:
    """False when ``value`` (a string, or JSON holding strings) has a lone surrogate: JSON may escape one
    (``"\\ud800"``), Python decodes it, but no tokenizer or UTF-8 file takes it."""
    try:
        (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def write_jsonl(path: str | os.PathLike, rows: Iterable[object]) -> int:
    """Writes one JSON object per line atomically; returns the number of lines."""
    count = 0
    with atomic_file(path, encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
