"""Shared benchmark inputs: real SciFact query-passage pairs, identical for every system measured."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

from matryoshka_reranker.pipeline.beir import load_corpus, load_qrels, load_queries

SCIFACT = Path(__file__).resolve().parents[1] / "data" / "scifact"


def scifact_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (query, passage) pairs from SciFact test queries and their cited abstracts + random ones."""
    corpus, queries, qrels = load_corpus(SCIFACT), load_queries(SCIFACT), load_qrels(SCIFACT, "test")
    rng = random.Random(seed)
    doc_ids = sorted(corpus)
    pairs = []
    for qid in sorted(qrels):
        for doc_id in list(qrels[qid]) + [rng.choice(doc_ids)]:
            pairs.append((queries[qid], corpus[doc_id]))
    rng.shuffle(pairs)
    return pairs[:count]


def interleaved_timing(systems: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each system, measured round-robin so load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    for fn in systems.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in systems.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
