"""Choosing the token adapter's step count without the test queries: unlabelled held-out pseudo-queries.

The token adapter's objective (``same_layer_mse``) needs no relevance labels: it makes the compressed
model score as the uncompressed one. So how well it has learned can be checked on queries it never saw,
without judgements: how closely ratio r's scores follow ratio 1's (mean per-query Spearman rho) on
held-out queries. SciFact's 809 train queries all trained the stacks, and its 300 test queries are for
reporting only, so the held-out queries here are **corpus pseudo-queries**: a document's title as the
query, the BM25 top-20 abstracts for it (title not included, so the source is not matched by its own
title) as the candidates, no document judged for a test query used as a source (the rule of the exit-8
specialist's pseudo-queries, docs/quality.md). The source abstract is also a weak label (relevance 1),
so nDCG@10 on these queries is reported beside the agreement, as a secondary check.

    python pseudo_val.py build --corpus data/scifact/corpus.jsonl.gz --test-qrels data/scifact/qrels/test.tsv \
        --out pseudo_val --queries 200 --params P.yaml [--params P2.yaml ...]
        # writes pseudo_val/{eval_candidates.jsonl, qrels/test.tsv} and P_pseudo.yaml for each params file
        # (data.beir_dir and paths.eval_candidates pointed there); then score with scripts/fusion_eval.py
    python pseudo_val.py compare -p P_pseudo.yaml --full R1.json --arm "600 steps" A.json --arm "1,200 steps" B.json
        # per exit: rho of each arm's ratio-r scores vs the ratio-1 scores, the paired difference of the
        # last two arms (per-query rho, bootstrap over queries), and nDCG@10 (source abstract = relevant)
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[3]


def build(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from matryoshka_reranker.core.bm25 import BM25Index

    corpus = [json.loads(line) for line in gzip.open(args.corpus, "rt", encoding="utf-8")]
    lines = Path(args.test_qrels).read_text().splitlines()[1:]
    test_docs = {line.split("\t")[1] for line in lines if line.strip()}
    abstracts = {d["_id"]: d["text"] for d in corpus if len(d["text"]) >= 200}
    pool = [d for d in corpus if d["_id"] in abstracts and d["_id"] not in test_docs and len(d["title"]) >= 40]
    random.Random(args.seed).shuffle(pool)
    sources = pool[:args.queries]
    hits = BM25Index(abstracts).search([d["title"] for d in sources], args.candidates)
    out = Path(args.out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "eval_candidates.jsonl", "w", encoding="utf-8") as f:
        for d, row in zip(sources, hits):
            f.write(json.dumps({"query_id": f"t{d['_id']}", "query": d["title"],
                                "candidates": [{"doc_id": i, "text": abstracts[i], "bm25": s} for i, s in row]}) + "\n")
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"t{d['_id']}\t{d['_id']}\t1\n" for d in sources))
    found = sum(d["_id"] in {i for i, _ in row} for d, row in zip(sources, hits))
    print(f"{len(sources)} pseudo-queries x {args.candidates} BM25 abstracts ({found} with the source among them); "
          f"{len(test_docs)} test-judged documents excluded as sources -> {out}")
    for p in args.params:
        params = yaml.safe_load(open(p))
        params["data"]["beir_dir"], params["data"]["eval_split"] = str(out), "test"
        params["paths"]["eval_candidates"] = str(out / "eval_candidates.jsonl")
        target = Path(p).with_name(Path(p).stem + "_pseudo.yaml")
        yaml.safe_dump(params, open(target, "w"), sort_keys=False)
        print("wrote", target)


def compare(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "docs" / "results" / "scifact-cpu-rank64-1200"))
    from matryoshka_reranker.config import load_params
    from matryoshka_reranker.pipeline import statistics
    from matryoshka_reranker.pipeline.evaluation import load_eval_set
    from eval300 import load_scores
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from agreement300 import per_query_rho  # the same folder

    params = load_params(args.params)
    queries, qrels = load_eval_set(params)
    ids = [q.query_id for q in queries]
    full = json.load(open(args.full))
    arms = [(label, json.load(open(path)), path) for label, path in args.arm]
    exits = sorted(full["scores"], key=int)
    print(f"{len(ids)} held-out pseudo-queries x {len(queries[0].candidates)} candidates; "
          f"ratio-1 scores {args.full}; arms: " + ", ".join(f"{label} = {path}" for label, _, path in arms) + "\n")
    ndcg = {}
    for label, saved, path in arms + [("ratio 1", full, args.full)]:
        _, by_exit = load_scores(Path(path), queries, qrels, ["nDCG@10"])
        ndcg[label] = {k: np.array([by_exit[k]["nDCG@10"][q] for q in ids]) for k in by_exit}
    header = " | ".join(f"{label}: rho / nDCG@10" for label, _, _ in arms)
    first, last = arms[-2][0] if len(arms) > 1 else arms[0][0], arms[-1][0]  # the last two arms are compared
    print(f"| exit | ratio 1 nDCG@10 | {header} | rho, {last} - {first} [95% CI] | "
          f"nDCG@10, {last} - {first} [95% CI] |")
    print("|---|---|" + "---|" * len(arms) + "---|---|")
    mean_rho = {label: [] for label, _, _ in arms}
    for k in exits:
        rhos = {label: per_query_rho(saved, full, k) for label, saved, _ in arms}
        for label in rhos:
            mean_rho[label].append(rhos[label])
        d_rho = statistics.paired_difference(rhos[last], rhos[first], 0.95, args.resamples)
        d_ndcg = statistics.paired_difference(ndcg[last][k], ndcg[first][k], 0.95, args.resamples)
        cells = " | ".join(f"{rhos[label].mean():.3f} / {ndcg[label][k].mean():.3f}" for label, _, _ in arms)
        print(f"| {k} | {ndcg['ratio 1'][k].mean():.3f} | {cells} | {d_rho.mean:+.4f} [{d_rho.low:+.4f}, {d_rho.high:+.4f}] "
              f"(p {d_rho.p_value:.3f}) | {d_ndcg.mean:+.3f} [{d_ndcg.low:+.3f}, {d_ndcg.high:+.3f}] |")
    if args.compressed_exits:
        sel = [exits.index(str(k)) for k in args.compressed_exits]
        avg = {label: np.mean([mean_rho[label][i] for i in sel], axis=0) for label in mean_rho}
        d = statistics.paired_difference(avg[last], avg[first], 0.95, args.resamples)
        print(f"\nrho averaged over exits {', '.join(map(str, args.compressed_exits))} (the decision rule): "
              + ", ".join(f"{label} {avg[label].mean():.4f}" for label in avg)
              + f"; {last} - {first} {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] (p {d.p_value:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--corpus", required=True)
    b.add_argument("--test-qrels", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--queries", type=int, default=200)
    b.add_argument("--candidates", type=int, default=20)
    b.add_argument("--seed", type=int, default=11)
    b.add_argument("--params", action="append", default=[])
    c = sub.add_parser("compare")
    c.add_argument("-p", "--params", required=True)
    c.add_argument("--full", required=True, help="ratio-1 scores (fusion_eval.py --scores-out)")
    c.add_argument("--arm", nargs=2, action="append", required=True, metavar=("LABEL", "SCORES"))
    c.add_argument("--compressed-exits", type=int, nargs="*", default=[16, 24, 30])
    c.add_argument("--resamples", type=int, default=10000)
    args = parser.parse_args()
    build(args) if args.command == "build" else compare(args)


if __name__ == "__main__":
    main()
