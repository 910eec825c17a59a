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


def _open_jsonl(folder: Path, stem: str) -> Iterator[dict]:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).exists():
            for where, row in read_jsonl(folder / name, what=f"BEIR {stem}"):
                if not isinstance(row, dict) or "_id" not in row:
                    raise InputError(f"{where}: expected an object with an '_id'")
                yield row
            return
    raise FileNotFoundError(f"{folder}: no {stem}.jsonl or {stem}.jsonl.gz")


def load_corpus(folder: str | Path) -> dict[str, str]:
    """doc id -> "title. text" (title omitted when empty)."""
    docs = {}
    for row in _open_jsonl(Path(folder), "corpus"):
        title, text = (row.get("title") or "").strip(), (row.get("text") or "").strip()
        docs[str(row["_id"])] = f"{title}. {text}" if title else text
    return docs


def load_queries(folder: str | Path) -> dict[str, str]:
    """query id -> text (never metadata)."""
    return {str(row["_id"]): row["text"] for row in _open_jsonl(Path(folder), "queries")}


def load_qrels(folder: str | Path, split: str) -> dict[str, dict[str, int]]:
    """query id -> {doc id: relevance} for one split (BEIR TSV with a header row)."""
    path = Path(folder) / "qrels" / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"no qrels file {path}")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise InputError(f"{path}: expected header 'query-id corpus-id score'")
        for number, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                qrels.setdefault(row[0].strip(), {})[row[1].strip()] = int(row[2])
            except (IndexError, ValueError):
                raise InputError(f"{path}:{number}: expected three tab-separated fields") from None
    return qrels
