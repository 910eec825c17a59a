"""Step 2's eval set: every 8th training query of derived300/train_groups.jsonl (100), its positive and
15 BM25 negatives as candidates (no BM25 scores: the BM25 row of the output is meaningless), qrels marking
the positive; written to trainfit/ for params_fit_*.yaml (data.beir_dir: trainfit, data.eval_split: fit)."""
import json
from pathlib import Path

rows = [json.loads(line) for line in open("derived300/train_groups.jsonl")]
selected = rows[::8][:100]
Path("trainfit/qrels").mkdir(parents=True, exist_ok=True)
with open("trainfit/candidates.jsonl", "w") as out, open("trainfit/qrels/fit.tsv", "w") as qrels:
    qrels.write("query-id\tcorpus-id\tscore\n")
    for r in selected:
        candidates = [{"doc_id": f"p{i}", "text": t, "bm25": 0.0} for i, t in enumerate(r["pos"])]
        candidates += [{"doc_id": f"n{i}", "text": t, "bm25": 0.0} for i, t in enumerate(r["neg"])]
        out.write(json.dumps({"query_id": r["query_id"], "query": r["query"], "candidates": candidates}) + "\n")
        for i in range(len(r["pos"])):
            qrels.write(f"{r['query_id']}\tp{i}\t1\n")
