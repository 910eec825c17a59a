"""Shared benchmark inputs: real SciFact query-passage pairs, identical for every system measured."""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from contextlib import contextmanager, nullcontext
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


def padded_batch(model: str, pairs: int, batch_size: int | None = None):
    """The speed benchmarks' shared input, as issue 13's table measured it: ``MatryoshkaReranker`` in fp32 with
    queries cut at 64 and passages at 160 tokens, and the first ``pairs`` of ``scifact_pairs`` encoded into one
    right-padded batch. Returns (reranker, batch)."""
    from matryoshka_reranker.model.inputs import InputFormat
    from matryoshka_reranker.serving.reranker import MatryoshkaReranker

    reranker = MatryoshkaReranker(model, input_format=InputFormat(query_max_len=64, passage_max_len=160),
                                  batch_size=batch_size or pairs, dtype="float32")
    encoder = reranker.encoder
    return reranker, encoder.collate([encoder.encode(q, p) for q, p in scifact_pairs(pairs)])


@contextmanager
def whole_last_layer():
    """Our forward as upstream's code runs it in one respect: the deepest layer for every token (ours runs it for
    each row's last token only since 2026-12-07, ``modeling.last_token_layer``). For the upstream-style rows."""
    from matryoshka_reranker.model import modeling

    real = modeling.trim_problem
    modeling.trim_problem = lambda layer: "upstream-style: the whole layer"
    try:
        yield
    finally:
        modeling.trim_problem = real


def machine_line() -> str:
    """The CPU a run measured and what its int8/fp32 kernels can use: ratios move with it (a session's
    machine is not fixed; AVX-512 VNNI changes ONNX Runtime's int8 kernels), so every report names it."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags] or ["no avx2/avx512/vnni/amx flag read"]
    import onnxruntime
    import torch

    return (f"# machine: {model}, {os.cpu_count()} cores, {' '.join(simd)}; torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}")


def round_orders(names: list, rounds: int, seed: int = 0) -> list[list]:
    """The order of each timing round: a new seeded shuffle every round, never starting with the system that
    ended the round before (no system runs twice in a row). A fixed cyclic rotation (what this did before)
    left every system not yet rotated to the front after the same predecessor in every round (with 3 rounds
    and 16 systems, 13 of them), so cache and allocator state left by one system always met the same next one."""
    rng, orders, last = random.Random(seed), [], None
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        if len(order) > 1 and order[0] == last:
            order.append(order.pop(0))  # the repeated one to the end: still a permutation
        orders.append(order)
        last = order[-1]
    return orders


def interleaved_timing(systems: dict, rounds: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per call of each system, measured round-robin so load changes hit all alike; every
    round runs the systems in a new seeded order (``round_orders``), so no system always runs first (after
    an idle gap) or after the same one."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    for fn in systems.values():  # warm-up
        fn()
    for order in round_orders(list(systems), rounds, seed):
        for name in order:
            start = time.perf_counter()
            systems[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def quantization_inputs(params_path: str):
    """What the quantization benchmarks share: (params, eval queries, qrels, calibration set), after printing
    the machine line. The calibration set is the Platt half of the eval queries (``pipeline/calibration.py``, at
    least 8 queries): the benchmarks score the other half, and ``bench_quantize --calibration eval`` smooths with
    it (the export's source until 2026-12-07; it now takes training pairs, ``export.quantization_pairs``)."""
    from matryoshka_reranker.config import load_params
    from matryoshka_reranker.pipeline.calibration import calibration_set
    from matryoshka_reranker.pipeline.evaluation import load_eval_set

    print(machine_line(), flush=True)
    params = load_params(params_path)
    queries, qrels = load_eval_set(params)
    return params, queries, qrels, calibration_set(queries, qrels, max(params.export.calibration_queries, 8))
