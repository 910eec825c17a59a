"""Two score files of scripts/fusion_eval.py over the same 300-query eval set, paired per exit:
nDCG@10 of each, the difference A - B with its 95% paired bootstrap interval and sign-flip p.

    python docs/results/compensation-mse/paired300.py -p <params> --a <scores A.json> --b <scores B.json>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "docs/results/scifact-cpu-rank64-1200"))

from matryoshka_reranker.config import load_params  # noqa: E402
from matryoshka_reranker.pipeline import statistics  # noqa: E402
from matryoshka_reranker.pipeline.evaluation import load_eval_set  # noqa: E402
from eval300 import load_scores  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("--a", type=Path, required=True)
    parser.add_argument("--b", type=Path, required=True)
    args = parser.parse_args()
    queries, qrels = load_eval_set(load_params(args.params))
    (_, a), (_, b) = (load_scores(p, queries, qrels, ["nDCG@10"]) for p in (args.a, args.b))
    ids = [q.query_id for q in queries]
    print(f"{len(ids)} queries; A = {args.a.name}, B = {args.b.name}")
    print("| exit | A | B | A - B [95% CI] | p |")
    print("|---|---|---|---|---|")
    for k in sorted(a, key=int):
        x, y = ([s[k]["nDCG@10"][q] for q in ids] for s in (a, b))
        d = statistics.paired_difference(x, y, 0.95)
        print(f"| {k} | {sum(x) / len(x):.3f} | {sum(y) / len(y):.3f} | {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | {d.p_value:.3f} |")


if __name__ == "__main__":
    main()
