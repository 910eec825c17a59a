"""Paired nDCG@10 differences between saved per-pair score files (fusion_eval --scores-out)."""
import json, sys
sys.path.insert(0, "src")
from matryoshka_reranker.config import load_params
from matryoshka_reranker.pipeline import statistics
from matryoshka_reranker.pipeline.evaluation import load_eval_set, per_query, scores_by_query, first_stage_per_query

params = load_params(sys.argv[1])
queries, qrels = load_eval_set(params)
measure = params.evaluation.measures[0]
systems = {"bm25": first_stage_per_query(queries, qrels, [measure])[measure]}
for spec in sys.argv[2:]:
    name, path = spec.split("=")
    d = json.load(open(path))
    assert d["query_ids"] == [q.query_id for q in queries], path
    for k, v in d["scores"].items():
        systems[f"{name}@{k}"] = per_query(queries, scores_by_query(queries, v), qrels, [measure])[measure]
names = list(systems)
for n in names:
    m = statistics.mean_interval(list(systems[n].values()))
    print(f"{n:<16} {m.mean:.3f} [{m.low:.3f}, {m.high:.3f}]")
for a in names:
    for b in names:
        if a < b:
            x, y = statistics.aligned(systems[a], systems[b])
            d = statistics.paired_difference(x, y)
            print(f"{a} - {b}: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] p {d.p_value:.3f}")
