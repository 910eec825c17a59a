"""BEIR dataset -> training groups (BM25 hard negatives) and eval candidates (BM25 top-k).

Documents are indexed as "title. text" with bm25s (lower-cased words, English stopwords). A
training group is a query of ``data.train_split`` with its judged positives and the BM25 top
``data.negatives_per_query`` documents that are not judged positive. Eval candidates are the
BM25 top ``data.eval_candidates`` of each ``data.eval_split`` query, in BM25 order, judged or not.
Query subsets are seeded samples of the queries that have at least one positive judgement.
With ``data.train_file`` set, that file is copied unchanged as the training groups instead; the
``validate`` stage checks it (one report for every kind of bad line, before any training).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import Params
from ..core.atomic import atomic_file
from ..core.bm25 import BM25Index
from ..core.errors import InputError
from .beir import load_corpus, load_qrels, load_queries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareSummary:
    train_groups: int
    eval_queries: int
    source: str  # "bm25" or the user's training file


def sample_queries(qrels: dict[str, dict[str, int]], queries: dict[str, str], count: int, seed: int) -> list[str]:
    """A seeded, sorted sample of query ids with a positive judgement and a text (0 = all)."""
    candidates = sorted(q for q, docs in qrels.items() if q in queries and any(r > 0 for r in docs.values()))
    if count and count < len(candidates):
        candidates = sorted(random.Random(seed).sample(candidates, count))
    return candidates


def check_ids(beir_dir, split: str, qrels: dict[str, dict[str, int]], corpus, queries) -> None:
    """Refuses a split whose judged queries are not in queries.jsonl, or whose relevant documents are not in
    the corpus (ids that do not match, e.g. "q1" vs "1"): every query would be dropped, or ranked against
    nothing relevant. Some missing is logged, not refused."""
    where = Path(beir_dir) / "qrels" / f"{split}.tsv"
    judged = {q: [d for d, r in docs.items() if r > 0] for q, docs in qrels.items()}
    judged = {q: docs for q, docs in judged.items() if docs}
    if not judged:
        raise InputError(f"{where}: no positive judgement (a score > 0)")
    known = [q for q in judged if q in queries]
    if not known:
        raise InputError(f"{where}: none of its {len(judged)} judged query ids is in queries.jsonl "
                         f"(qrels {sorted(judged)[:3]}, queries {sorted(queries)[:3]})")
    if not any(d in corpus for q in known for d in judged[q]):
        relevant = sorted({d for q in known for d in judged[q]})
        raise InputError(f"{where}: none of its relevant document ids is in the corpus "
                         f"(qrels {relevant[:3]}, corpus {sorted(corpus)[:3]})")
    if len(known) < len(judged):
        log.warning("%s: %d of %d judged queries have no text in queries.jsonl; skipped",
                    where, len(judged) - len(known), len(judged))


def mine_training_groups(params: Params, corpus, queries, index: BM25Index) -> list[dict]:
    data = params.data
    qrels = load_qrels(data.beir_dir, data.train_split)
    check_ids(data.beir_dir, data.train_split, qrels, corpus, queries)
    query_ids = sample_queries(qrels, queries, data.train_queries, data.seed)
    groups = []
    bounds = params.validation  # what `validate` refuses is left out here, counted, so validation passes what is mined
    fits = lambda text: bounds.min_passage_chars <= len(text) <= bounds.max_passage_chars  # noqa: E731
    judged_positives = {q: [d for d, r in qrels[q].items() if r > 0 and d in corpus] for q in query_ids}
    positives = {q: [d for d in docs if fits(corpus[d])] for q, docs in judged_positives.items()}
    outside = sum(len(judged_positives[q]) - len(positives[q]) for q in query_ids)
    query_fits = {q: queries[q].strip() != "" and bounds.min_query_chars <= len(queries[q]) <= bounds.max_query_chars
                  for q in query_ids}
    dropped = [q for q in query_ids if judged_positives[q] and (not positives[q] or not query_fits[q])]
    if outside or dropped:
        log.warning("%s: %d positive passage(s) outside validation.min/max_passage_chars left out; %d query(ies) "
                    "dropped (no positive left, or the query outside validation.min/max_query_chars)",
                    data.train_split, outside, len(dropped))
    query_ids = [q for q in query_ids if positives[q] and query_fits[q]]
    # Ask for enough documents that skipping the judged ones still leaves negatives_per_query.
    depth = data.negatives_per_query + max((len(qrels[q]) for q in query_ids), default=0)
    hits = index.search([queries[q] for q in query_ids], depth)
    for q, ranked in zip(query_ids, hits):
        judged = set(qrels[q])  # any judgement, even 0, is not a safe negative
        seen = {corpus[d] for d in positives[q]}  # a copy of a positive's text is not a negative either
        neg_ids = []
        for d, _ in ranked:
            text = corpus[d]
            if d in judged or text in seen or not fits(text):
                continue  # what `validate` would refuse: a positive's text, a repeat, a length out of bounds
            seen.add(text)
            neg_ids.append(d)
            if len(neg_ids) == data.negatives_per_query:
                break
        if not neg_ids:
            log.warning("query %s: no BM25 negative left after skipping judged documents; dropped", q)
            continue
        groups.append({
            "query_id": q, "query": queries[q],
            "pos": [corpus[d] for d in positives[q]], "pos_ids": positives[q],
            "neg": [corpus[d] for d in neg_ids], "neg_ids": neg_ids,
        })
    return groups


def eval_candidates(params: Params, corpus, queries, index: BM25Index) -> list[dict]:
    data = params.data
    qrels = load_qrels(data.beir_dir, data.eval_split)
    check_ids(data.beir_dir, data.eval_split, qrels, corpus, queries)
    query_ids = sample_queries(qrels, queries, data.eval_queries, data.seed)
    hits = index.search([queries[q] for q in query_ids], data.eval_candidates)
    return [
        {"query_id": q, "query": queries[q],
         "candidates": [{"doc_id": d, "text": corpus[d], "bm25": score} for d, score in ranked]}
        for q, ranked in zip(query_ids, hits)
    ]


def _write_jsonl(path, rows: list[dict]) -> None:
    with atomic_file(path, encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def check_model_depth(params: Params) -> None:
    """The settings that must fit the model's depth (``export.exit_layers``, compression layers, specialists, ...),
    read from the model folder's config.json before any data work: a 24-layer model with the default exits
    [8, 16, 24, 30] is refused here, not after BM25 mining and teacher scoring. The embedded default fits the
    defaults and is checked when training loads it (``check_against_model``, which also checks positions)."""
    from ..core.assets import EMBEDDED_PREFIX

    name = str(params.model.name_or_path)
    folder = Path(name)
    if name.startswith(EMBEDDED_PREFIX) or not (folder / "config.json").is_file():
        return  # embedded, or not a model folder: refused with its own message where the model loads
    try:
        config = json.loads((folder / "config.json").read_text())
        meta = json.loads((folder / "matryoshka.json").read_text()) if (folder / "matryoshka.json").is_file() else {}
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"model.name_or_path: {folder}/config.json cannot be read ({err})") from None
    layers = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        return  # an unusual config: the load-time check decides
    start, sep = params.model.start_layer, params.model.layer_sep
    saved = [f"model.{key} {value}: the saved Matryoshka model was trained with {meta[key]}"
             for key, value in (("start_layer", start), ("layer_sep", sep)) if key in meta and meta[key] != value]
    exits = list(range(start, layers + 1, sep))
    problems = saved + (params.depth_problems(layers, exits) if exits else [f"model.start_layer {start}: the model "
                                                                            f"has {layers} layers"])
    if problems:
        raise InputError(f"params do not fit the model {folder} ({layers} layers): " + "; ".join(problems))


def prepare(params: Params) -> PrepareSummary:
    """Writes ``paths.train_groups`` and ``paths.eval_candidates`` (each atomically)."""
    data, paths = params.data, params.paths
    if data.train_split == data.eval_split and data.train_file is None:
        raise ValueError(f"train_split and eval_split are both {data.train_split!r}: evaluation would leak")
    check_model_depth(params)
    qrels = Path(data.beir_dir) / "qrels"
    wanted = [(data.eval_split, "data.eval_split")] + ([] if data.train_file else [(data.train_split, "data.train_split")])
    for split, key in wanted:  # before indexing the corpus: many BEIR sets ship only qrels/test.tsv
        if not (qrels / f"{split}.tsv").is_file():
            have = sorted(f.stem for f in qrels.glob("*.tsv")) if qrels.is_dir() else []
            raise FileNotFoundError(
                f"{key}: no qrels file {qrels / f'{split}.tsv'} (splits here: {', '.join(have) or 'none'})"
                + ("; without a train split, bring your own training groups: data.train_file" if key == "data.train_split"
                   else ""))
    if data.train_file and str(data.train_file).endswith(".gz"):
        raise InputError(f"data.train_file: {data.train_file} is gzipped; decompress it (the training file is copied "
                         "as is and read as UTF-8 JSON lines)")
    corpus = load_corpus(data.beir_dir)
    queries = load_queries(data.beir_dir)
    if not corpus:
        raise InputError(f"{data.beir_dir}: the corpus holds no document")
    log.info("indexing %d documents with BM25", len(corpus))
    index = BM25Index(corpus)

    candidates = eval_candidates(params, corpus, queries, index)
    if data.train_file:
        if not Path(data.train_file).is_file():
            raise FileNotFoundError(f"data.train_file: {data.train_file} does not exist")
        _copy_atomic(data.train_file, paths.train_groups)
        count, _ = read_user_groups(paths.train_groups, candidates)
        source = data.train_file
    else:
        groups = mine_training_groups(params, corpus, queries, index)
        if not groups:
            raise ValueError(f"no training groups could be built from {data.beir_dir} split {data.train_split!r}")
        _write_jsonl(paths.train_groups, groups)
        count, source = len(groups), "bm25"
    _write_jsonl(paths.eval_candidates, candidates)
    log.info("wrote %d training groups (%s) and %d eval queries", count, source, len(candidates))
    return PrepareSummary(count, len(candidates), source)


def read_user_groups(train_file, candidates: list[dict]) -> tuple[int, int]:
    """(non-blank lines, eval queries also in the file) of a user's training file, warning when any eval query
    appears there (same text, case and spacing aside): trained on, it inflates every quality figure. (Mined groups
    come from another split; a bad line is counted and left for `validate` to report.)"""
    norm = lambda text: " ".join(str(text).lower().split())  # noqa: E731
    trained, lines = set(), 0
    with open(train_file, "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            lines += 1
            try:
                row = json.loads(raw)
            except ValueError:  # not JSON, not UTF-8: `validate` reports it
                continue
            if isinstance(row, dict) and isinstance(row.get("query"), str):
                trained.add(norm(row["query"]))
    overlap = sum(norm(c["query"]) in trained for c in candidates)
    if overlap:
        log.warning("%d of %d eval queries are also in the training file %s: the evaluation of those is not held out",
                    overlap, len(candidates), train_file)
    return lines, overlap


def _copy_atomic(src, dst) -> None:
    with open(src, "rb") as source, atomic_file(dst, "wb") as target:
        shutil.copyfileobj(source, target)
