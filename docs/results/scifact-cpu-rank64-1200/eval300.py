"""The 1,200-step model on all 300 SciFact test queries x 20 BM25 candidates (the analysis behind
docs/quality.md, "All 300 test queries").

The scores come from one PyTorch pass of scripts/fusion_eval.py over the eval set that
``data.eval_queries: 0`` prepares (its first 100 queries are byte-identical to the 100 every other
scifact-cpu table uses):

    matryoshka prepare -p params300.yaml          # params.yaml with data.eval_queries: 0, paths to derived300/
    python scripts/fusion_eval.py -p params300.yaml --ratio 1 --adapters self_distill \
        --exits 8 --exits 16 --exits 24 --exits 30 --scores-out scores_1200.json
    python docs/results/scifact-cpu-rank64-1200/eval300.py -p params300.yaml --scores scores_1200.json \
        --first100 derived/eval_candidates.jsonl
    # + the layer adapter, against the self-distilled model alone:
    python scripts/fusion_eval.py -p params300.yaml --ratio 1 --adapters pipeline ... --scores-out scores_layer.json
    python docs/results/scifact-cpu-rank64-1200/eval300.py -p params300.yaml --scores scores_layer.json \
        --first100 derived/eval_candidates.jsonl --against scores_1200.json

Prints, for all 300 queries, for the 100 the earlier tables used and for the 200 never looked at
before: nDCG@10 / RR@10 / R@10 per exit with 95% bootstrap intervals, each exit's paired difference
to BM25 (bootstrap interval, sign-flip p), the fusion with BM25 (weight 0.5, rank(first_stage_scores=))
and exit 8 minus exit 30.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src"))

from matryoshka_reranker.config import load_params  # noqa: E402
from matryoshka_reranker.pipeline import statistics  # noqa: E402
from matryoshka_reranker.pipeline.evaluation import (  # noqa: E402
    first_stage_per_query,
    load_eval_set,
    per_query,
    random_order_per_query,
    scores_by_query,
)
from matryoshka_reranker.serving.ranking import fuse_scores  # noqa: E402

MEASURES = ["nDCG@10", "RR@10", "R@10"]


def load_scores(path: Path, queries, qrels, measures=MEASURES) -> tuple[dict, dict[str, dict[str, dict[str, float]]]]:
    """A scores file of ``fusion_eval.py --scores-out`` -> (the file, {exit: {measure: {query id: value}}}),
    refused unless it was scored on exactly these eval queries."""
    saved = json.loads(path.read_text())
    if saved["query_ids"] != [q.query_id for q in queries]:
        raise SystemExit(f"{path} was scored on another eval set")
    return saved, {k: per_query(queries, scores_by_query(queries, flat), qrels, measures)
                   for k, flat in saved["scores"].items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("--scores", type=Path, required=True)
    parser.add_argument("--first100", type=Path, required=True, help="the 100-query eval file of the other tables")
    parser.add_argument("--against", type=Path, help="another scores file of the same eval set: paired differences per exit")
    parser.add_argument("--resamples", type=int, default=10000)
    args = parser.parse_args()

    params = load_params(args.params)
    queries, qrels = load_eval_set(params)
    saved, by_exit = load_scores(args.scores, queries, qrels)
    first100 = {json.loads(line)["query_id"] for line in args.first100.open()}
    systems = {"random order": random_order_per_query(queries, qrels, MEASURES),
               "bm25 order": first_stage_per_query(queries, qrels, MEASURES)}
    for k, flat in saved["scores"].items():
        by_query = scores_by_query(queries, flat)
        systems[f"exit {k}"] = by_exit[k]
        systems[f"exit {k} + bm25"] = per_query(
            queries, {q.query_id: fuse_scores(by_query[q.query_id], [c.bm25 for c in q.candidates], 0.5)
                      for q in queries}, qrels, MEASURES)
    subsets = {"all 300": [q.query_id for q in queries],
               "the first 100 (earlier tables)": [q.query_id for q in queries if q.query_id in first100],
               "the other 200 (new)": [q.query_id for q in queries if q.query_id not in first100]}
    if args.against:  # read and evaluated once, compared on every subset
        other_saved, other = load_scores(args.against, queries, qrels, ["nDCG@10"])
        theirs_by_query = {k: scores_by_query(queries, f) for k, f in other_saved["scores"].items()}
    for label, ids in subsets.items():
        print(f"\n## {label}: {len(ids)} queries x 20 BM25 candidates (mean [95% CI]; vs BM25: paired, sign-flip p)")
        print("| system | nDCG@10 | RR@10 | R@10 | nDCG@10 - BM25 (p) | RR@10 - BM25 (p) | R@10 - BM25 (p) |")
        print("|---|---|---|---|---|---|---|")
        for name, values in systems.items():
            cells = []
            for m in MEASURES:
                iv = statistics.mean_interval([values[m][q] for q in ids], 0.95, args.resamples)
                cells.append(f"{iv.mean:.3f} [{iv.low:.3f}, {iv.high:.3f}]")
            for m in MEASURES:
                if name in ("bm25 order", "random order"):
                    cells.append("")
                    continue
                d = statistics.paired_difference([values[m][q] for q in ids],
                                                 [systems["bm25 order"][m][q] for q in ids], 0.95, args.resamples)
                cells.append(f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] ({d.p_value:.3f})")
            print(f"| {name} | " + " | ".join(cells) + " |")
        deepest = max(saved["scores"], key=int)
        for k in sorted(saved["scores"], key=int)[:-1]:
            d = statistics.paired_difference([systems[f"exit {k}"]["nDCG@10"][q] for q in ids],
                                             [systems[f"exit {deepest}"]["nDCG@10"][q] for q in ids], 0.95, args.resamples)
            print(f"exit {k} - exit {deepest}: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] p {d.p_value:.3f}")
        if args.against:
            for k in sorted(saved["scores"], key=int):
                theirs = other[k]["nDCG@10"]
                d = statistics.paired_difference([systems[f"exit {k}"]["nDCG@10"][q] for q in ids],
                                                 [theirs[q] for q in ids], 0.95, args.resamples)
                ours_q, theirs_q = scores_by_query(queries, saved["scores"][k]), theirs_by_query[k]
                rho = statistics.mean_interval([spearmanr(ours_q[q], theirs_q[q]).statistic for q in ids],
                                               0.95, args.resamples)
                print(f"exit {k}: these scores - {args.against.name}: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] "
                      f"p {d.p_value:.3f}; Spearman per query {rho.mean:.4f} [{rho.low:.4f}, {rho.high:.4f}]")


if __name__ == "__main__":
    main()
