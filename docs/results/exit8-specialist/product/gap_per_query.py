"""Paired differences of the specialist against the other configs and BM25, from the evaluate stage's
metrics/per_query.json (what specialist_gap300_onnx.txt holds):
    PYTHONPATH=src python docs/results/exit8-specialist/product/gap_per_query.py metrics/per_query.json"""
import json
import sys

from matryoshka_reranker.pipeline import statistics

pq = json.load(open(sys.argv[1]))["systems"]
s = "exit-08-ratio-1-specialist"
for m in ("nDCG@10", "RR@10", "R@10"):
    for other in ("exit-30-ratio-1", "exit-16-ratio-1", "exit-08-ratio-1", "bm25"):
        x, y = statistics.aligned(pq[s][m], pq[other][m])
        d = statistics.paired_difference(x, y)
        print(f"{m} {s} - {other}: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] p {d.p_value:.3f} (n {len(x)})")
