"""Reading a BEIR-style dataset: corpus.jsonl, queries.jsonl (optionally .gz), qrels/<split>.tsv.

Only ``_id``, ``title`` and ``text`` are read: SciFact's query ``metadata`` holds gold evidence
and must never reach a model.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import InputError
from ..core.jsonl import read_jsonl


def _open_jsonl(folder: Path, stem: str) -> Iterator[tuple[str, dict]]:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).exists():
            for where, row in read_jsonl(folder / name, what=f"BEIR {stem}"):
                if not isinstance(row, dict) or "_id" not in row:
                    raise InputError(f"{where}: expected an object with an '_id'")
                if not isinstance(row["_id"], (str, int)) or isinstance(row["_id"], bool):
                    raise InputError(f"{where}: '_id' must be a string or an integer, got {row['_id']!r}")
                yield where, row
            return
    raise FileNotFoundError(f"{folder}: no {stem}.jsonl or {stem}.jsonl.gz")


def _text(row: dict, key: str, where: str, required: bool = False) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: '{key}' must be a string, got {'nothing' if value is None else repr(value)}")
    return value


def _add(into: dict[str, str], lines: dict[str, str], row: dict, text: str, where: str) -> None:
    """One id, one text: a repeated '_id' with another text would make the qrels ambiguous."""
    key = str(row["_id"])
    if key in into and into[key] != text:
        raise InputError(f"{where}: '_id' {key!r} repeats {lines[key]} with another text")
    into[key] = text
    lines.setdefault(key, where)


def load_corpus(folder: str | Path) -> dict[str, str]:
    """doc id -> "title. text" (title omitted when empty)."""
    docs: dict[str, str] = {}
    lines: dict[str, str] = {}
    for where, row in _open_jsonl(Path(folder), "corpus"):
        title, text = _text(row, "title", where).strip(), _text(row, "text", where).strip()
        _add(docs, lines, row, f"{title}. {text}" if title else text, where)
    return docs


def load_queries(folder: str | Path) -> dict[str, str]:
    """query id -> text (never metadata)."""
    queries: dict[str, str] = {}
    lines: dict[str, str] = {}
    for where, row in _open_jsonl(Path(folder), "queries"):
        _add(queries, lines, row, _text(row, "text", where, required=True), where)
    return queries


def load_qrels(folder: str | Path, split: str) -> dict[str, dict[str, int]]:
    """query id -> {doc id: relevance} for one split (BEIR TSV with a header row)."""
    path = Path(folder) / "qrels" / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"no qrels file {path}")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, "rb") as handle:  # bytes: a line that is not UTF-8 is named, not a bare codec error
        reader = csv.reader(_utf8_lines(handle, path), delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise InputError(f"{path}: expected header 'query-id corpus-id score'")
        for number, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                qrels.setdefault(row[0].strip(), {})[row[1].strip()] = int(row[2])
            except (IndexError, ValueError):
                raise InputError(f"{path}:{number}: expected three tab-separated fields "
                                 "(query-id, corpus-id, an integer score)") from None
    return qrels


def _utf8_lines(handle, path: Path) -> Iterator[str]:
    for number, raw in enumerate(handle, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start})") from None
