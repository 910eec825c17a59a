"""Both seeds pooled: per query, the mean of the two specialists' exit-8 nDCG@10 minus the mean of the
two stacks' exit-30 nDCG@10 (and each seed's own gap), paired bootstrap over queries."""
import json, sys
sys.path.insert(0, "src")
import numpy as np
from matryoshka_reranker.config import load_params
from matryoshka_reranker.pipeline import statistics
from matryoshka_reranker.pipeline.evaluation import load_eval_set, per_query, scores_by_query

params = load_params(sys.argv[1])
queries, qrels = load_eval_set(params)
measure = params.evaluation.measures[0]
def ndcg(path, exit_layer):
    d = json.load(open(path))
    assert d["query_ids"] == [q.query_id for q in queries], path
    v = per_query(queries, scores_by_query(queries, d["scores"][str(exit_layer)]), qrels, [measure])[measure]
    return np.array([v[q.query_id] for q in queries])
spec42, spec7 = ndcg(sys.argv[2], 8), ndcg(sys.argv[3], 8)
full42, full7 = ndcg(sys.argv[4], 30), ndcg(sys.argv[5], 30)
for name, a, b in (("seed 42: specialist - stack exit 30", spec42, full42),
                   ("seed 7: specialist - stack exit 30", spec7, full7),
                   ("both seeds' mean: specialist - stack exit 30", (spec42 + spec7) / 2, (full42 + full7) / 2),
                   ("seed 7 - seed 42, specialists", spec7, spec42)):
    d = statistics.paired_difference(a, b)
    print(f"{name}: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] p {d.p_value:.3f}")
