"""Compensation on all 300 SciFact test queries: the ratio-4 drop before and after the adapters.

Four score files of scripts/fusion_eval.py over the same 300-query eval set (docs/quality.md,
"All 300 test queries"): the self-distilled model at ratio 1 and 4 (``--adapters self_distill``),
and the released stack at ratio 1 and 4 (``--adapters pipeline``: + layer adapter, + token-ratio-4
adapter at ratio 4). Prints per exit the drop (ratio 1 - ratio 4, paired, 95% bootstrap interval)
before and after, and the share recovered, 1 - drop_after / drop_before, with the interval
``matryoshka effects`` uses (queries resampled jointly), for all 300, the first 100 and the other 200.

    python docs/results/scifact-cpu-rank64-1200/compensation300.py -p params300.yaml \
        --before scores_1200.json scores_1200_r4.json --after scores_1200_layer.json scores_1200_stack_r4.json \
        --first100 derived/eval_candidates.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from matryoshka_reranker.config import load_params  # noqa: E402
from matryoshka_reranker.pipeline import statistics  # noqa: E402
from matryoshka_reranker.pipeline.effects import _bootstrap_recovered  # noqa: E402
from matryoshka_reranker.pipeline.evaluation import load_eval_set  # noqa: E402
from eval300 import load_scores  # noqa: E402  (the same folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("--before", type=Path, nargs=2, required=True, metavar=("RATIO1", "RATIOR"))
    parser.add_argument("--after", type=Path, nargs=2, required=True, metavar=("RATIO1", "RATIOR"))
    parser.add_argument("--first100", type=Path, required=True)
    parser.add_argument("--resamples", type=int, default=10000)
    args = parser.parse_args()

    params = load_params(args.params)
    queries, qrels = load_eval_set(params)
    values, ratio = {}, None
    for when, (one, other) in (("before", args.before), ("after", args.after)):
        (_, at_1), (saved_r, at_r) = (load_scores(p, queries, qrels, ["nDCG@10"]) for p in (one, other))
        ratio = saved_r["ratio"]
        for k in at_1:
            values[(when, int(k), 1)], values[(when, int(k), ratio)] = at_1[k]["nDCG@10"], at_r[k]["nDCG@10"]
    first100 = {json.loads(line)["query_id"] for line in args.first100.open()}
    subsets = {"all 300": [q.query_id for q in queries],
               "the first 100": [q.query_id for q in queries if q.query_id in first100],
               "the other 200": [q.query_id for q in queries if q.query_id not in first100]}
    exits = sorted({k for (_, k, _) in values})
    for label, ids in subsets.items():
        print(f"\n## {label} ({len(ids)} queries): nDCG@10 drop of ratio {ratio} against ratio 1")
        print("| exit | before: r1 / r | drop before [95% CI] | after: r1 / r | drop after [95% CI] | recovered [95% CI] |")
        print("|---|---|---|---|---|---|")
        for k in exits:
            b1, br, a1, ar = ([values[(w, k, r)][q] for q in ids] for w, r in
                              (("before", 1), ("before", ratio), ("after", 1), ("after", ratio)))
            db = statistics.paired_difference(b1, br, 0.95, args.resamples)
            da = statistics.paired_difference(a1, ar, 0.95, args.resamples)
            rec = _bootstrap_recovered(b1, br, a1, ar, args.resamples)
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            print(f"| {k} | {mean(b1):.3f} / {mean(br):.3f} | {db.mean:+.3f} [{db.low:+.3f}, {db.high:+.3f}] | "
                  f"{mean(a1):.3f} / {mean(ar):.3f} | {da.mean:+.3f} [{da.low:+.3f}, {da.high:+.3f}] | "
                  f"{rec['recovered']:.2f} [{rec['recovered_ci'][0]:.2f}, {rec['recovered_ci'][1]:.2f}] |")


if __name__ == "__main__":
    main()
