"""JSON Lines, read and written in one way everywhere (training data, eval candidates, pairs, shards)."""

from __future__ import annotations

import json
import os
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
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonlError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def write_jsonl(path: str | os.PathLike, rows: Iterable[object]) -> int:
    """Writes one JSON object per line atomically; returns the number of lines."""
    count = 0
    with atomic_file(path, encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
