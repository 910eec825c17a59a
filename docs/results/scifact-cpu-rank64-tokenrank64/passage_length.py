"""The released first-round model (self-distillation + layer adapter) scored at exit 16 with passages cut
at 96 tokens (as trained) and at 256, on the same 100 test queries x 20; paired, and each vs BM25."""
import json, sys, time
sys.path.insert(0, "/work/main/src")
from matryoshka_reranker.config import load_params
from matryoshka_reranker.pipeline.evaluation import load_eval_set, per_query, scores_by_query
from matryoshka_reranker.pipeline import statistics
from matryoshka_reranker.serving.reranker import MatryoshkaReranker

params = load_params("/work/teach/qparams.yaml")
import os; os.chdir("/work/teach")
queries, qrels = load_eval_set(params)
pairs = [p for q in queries for p in q.pairs]
m = "nDCG@10"
systems = {"bm25": per_query(queries, {q.query_id: [c.bm25 for c in q.candidates] for q in queries}, qrels, [m])[m]}
exit_layer = int(sys.argv[1]) if len(sys.argv) > 1 else 16
for L in (96, 256):
    t = time.time()
    r = MatryoshkaReranker(params.model.name_or_path, peft_path=[f"/work/scratch/longer/p{L}/self_distill", f"/work/scratch/longer/p{L}/layer"], batch_size=16)
    assert r.input_format.passage_max_len == L
    scores = r.compute_score(pairs, cutoff_layers=[exit_layer])
    systems[L] = per_query(queries, scores_by_query(queries, scores), qrels, [m])[m]
    print(f"passage_max_len {L}: exit {exit_layer} scored in {time.time() - t:.0f} s", flush=True)
out = {}
for name in (96, 256):
    a, b = statistics.aligned(systems[name], systems["bm25"])
    print(f"{name}: {statistics.mean_interval(a)}  vs BM25 {statistics.paired_difference(a, b)}")
a, b = statistics.aligned(systems[256], systems[96])
print(f"256 - 96: {statistics.paired_difference(a, b)}")
json.dump({str(k): v for k, v in systems.items()}, open(f"/work/scratch/longer/per_query_exit{exit_layer}.json", "w"))
