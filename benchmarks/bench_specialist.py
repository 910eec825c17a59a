"""Pairs/s of an exit specialist's ONNX model beside the shared-weight exit it stands in for, interleaved.

    python -m benchmarks.bench_specialist --models models/onnx [--exit-layer 8] [--queries 20] [--rounds 3]

An export with ``specialist.exits`` holds ``exit-KK-ratio-1-specialist/`` (layers 1..k, weights of its own)
beside ``ratio-1/`` (every exit over one weights file). Both run k layers, so they should cost the same; the
evaluate stage's latency figures cannot show it (a variant is timed on every eval query, a shared exit on
``evaluation.latency_queries`` of them). Here every model scores the same eval queries' candidates (one call
per query, as served), round-robin, and full depth is timed alongside for scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import interleaved_timing, machine_line
from matryoshka_reranker.serving.artifacts import SPECIALIST, config_name, read_index
from matryoshka_reranker.serving.onnx_runtime import OnnxReranker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models/onnx"), help="export folder with index.json")
    parser.add_argument("--candidates", type=Path, default=Path("derived/eval_candidates.jsonl"))
    parser.add_argument("--exit-layer", type=int, default=8)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    args = parser.parse_args()
    print(machine_line(), flush=True)

    configs = {c.name: c for c in read_index(args.models)}
    k = args.exit_layer
    special = configs.get(config_name(k, 1, SPECIALIST))
    if special is None:
        raise SystemExit(f"{args.models}: no {config_name(k, 1, SPECIALIST)} (export with specialist.exits: [{k}])")
    deepest = max(c.exit_layer for c in configs.values() if c.variant is None and c.ratio == 1)
    models = {f"exit {k}, shared weights": configs[config_name(k, 1)], f"exit {k}, specialist": special,
              f"exit {deepest}, shared weights": configs[config_name(deepest, 1)]}
    threads = args.threads or None
    rerankers = {name: OnnxReranker(c.path, c.exit_layer, threads=threads) for name, c in models.items()}
    rows = [json.loads(line) for line in args.candidates.read_text().splitlines()[: args.queries]]
    queries = [(r["query"], [c["text"] for c in r["candidates"]]) for r in rows]
    pairs = sum(len(texts) for _, texts in queries)

    def run(reranker):
        return lambda: [reranker.compute_score([(q, t) for t in texts]) for q, texts in queries]

    seconds = interleaved_timing({name: run(r) for name, r in rerankers.items()}, args.rounds)
    shared = seconds[f"exit {k}, shared weights"]
    print(f"# {args.models}: {len(queries)} eval queries, {pairs} pairs, one call per query, {args.rounds} rounds "
          "round-robin (median)")
    print(f"{'model':28s} {'pairs/s':>8s} {'vs shared exit ' + str(k):>18s}")
    for name in rerankers:
        print(f"{name:28s} {pairs / seconds[name]:8.2f} {shared / seconds[name]:17.2f}x")


if __name__ == "__main__":
    main()
