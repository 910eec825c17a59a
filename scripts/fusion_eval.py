"""Does the re-ranker add to BM25? Its scores fused with the first stage's, on the eval candidates.

    python scripts/fusion_eval.py -p params.yaml [--ratio 1] [--weight 0.5] [--exits 8 --exits 30]
                                  [--adapters self_distill] [--out fusion.json] [--scores-out scores.json]

Scores every eval pair once (all asked exits in one PyTorch pass) with the pipeline's model at
``--ratio`` (``--adapters pipeline``: the released stack self_distill + layer [+ token]; ``self_distill``:
the self-distilled adapter alone), then per query min-max normalises the re-ranker's and BM25's
scores and ranks by ``weight * bm25 + (1 - weight) * reranker`` (the hybrid teacher's fusion,
``serving/ranking.py``, what ``rank(..., first_stage_scores=...)`` does; the weight 0.5 is the hybrid
teacher's, chosen on the validation split, docs/quality.md).
Prints nDCG@10 with 95% bootstrap intervals for BM25, the re-ranker alone and the fusion, and the
paired differences against BM25 (over the same queries). A measurement, not a pipeline stage: it
answers whether the student's signal complements the first stage's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from matryoshka_reranker.config import load_params  # noqa: E402
from matryoshka_reranker.core.atomic import write_json  # noqa: E402
from matryoshka_reranker.pipeline import statistics  # noqa: E402
from matryoshka_reranker.pipeline.evaluation import (  # noqa: E402
    first_stage_per_query,
    load_eval_set,
    per_query,
    pytorch_scorer,
    scores_by_query,
)
from matryoshka_reranker.serving.ranking import fuse_scores  # noqa: E402  (what rank(first_stage_scores=...) does)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("--ratio", type=int, default=1)
    parser.add_argument("--weight", type=float, default=0.5, help="BM25's share in the fusion")
    parser.add_argument("--exits", type=int, action="append", help="default: export.exit_layers")
    parser.add_argument("--adapters", choices=["pipeline", "self_distill"], default="pipeline")
    parser.add_argument("--limit", type=int, default=0, help="first N eval queries only (a smoke test)")
    parser.add_argument("--out", type=Path, help="the table as JSON, with every system's per-query values")
    parser.add_argument("--scores-out", type=Path, help="every pair's score per exit (JSON), to reuse without rescoring")
    args = parser.parse_args()

    params = load_params(args.params)
    if args.adapters == "self_distill":
        from matryoshka_reranker.pipeline.effects import _self_distilled_scorer as scorer_for
        score = scorer_for(params, args.ratio)
    else:
        score = pytorch_scorer(params, args.ratio)
    exits = sorted(args.exits or params.export.exit_layers)
    compress = tuple(params.compression.layers) if args.ratio > 1 else ()
    queries, qrels = load_eval_set(params)
    if args.limit:
        queries = queries[:args.limit]
        qrels = {q.query_id: qrels[q.query_id] for q in queries}
    flat = score([p for q in queries for p in q.pairs], exits, compress)  # one list of scores per exit
    if args.scores_out:
        write_json(args.scores_out, {"exits": exits, "ratio": args.ratio, "adapters": args.adapters,
                                     "query_ids": [q.query_id for q in queries],
                                     "scores": {str(k): list(map(float, v)) for k, v in zip(exits, flat)}}, indent=None)
    measure, ev = params.evaluation.measures[0], params.evaluation

    def system(scores_of) -> dict[str, float]:
        return per_query(queries, {q.query_id: list(scores_of(q)) for q in queries}, qrels, [measure])[measure]

    bm25 = first_stage_per_query(queries, qrels, [measure])[measure]  # the reference evaluate pairs with
    rows = {"bm25": bm25}
    for k, values in zip(exits, flat):
        by_query = scores_by_query(queries, values)
        rows[f"exit-{k}"] = system(lambda q: by_query[q.query_id])
        rows[f"exit-{k}+bm25"] = system(lambda q: fuse_scores(by_query[q.query_id],
                                                              [c.bm25 for c in q.candidates], args.weight))
    result = {"measure": measure, "queries": len(queries), "ratio": args.ratio, "weight": args.weight,
              "adapters": args.adapters, "systems": {}}
    for name, values in rows.items():
        a, b = statistics.aligned(values, bm25)
        mean = statistics.mean_interval(a, ev.confidence, ev.bootstrap_resamples)
        diff = statistics.paired_difference(a, b, ev.confidence, ev.bootstrap_resamples)
        result["systems"][name] = {"mean": mean.to_dict(), "vs_bm25": diff.to_dict(), "per_query": values}
        print(f"{name:<14} {measure} {mean.mean:.3f} [{mean.low:.3f}, {mean.high:.3f}]   vs BM25 "
              f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] p {diff.p_value:.3f}")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
