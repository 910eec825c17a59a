"""Compensation over several bf16 stacks at once: the recovered share of the mean drop of the seeds.

Each seed's recovered share divides two nDCG@10 drops of 0.02-0.04 measured on 300 queries, so one seed's
share is wide (docs/quality.md, "1,200 token steps"). Both seeds are scored on the *same* 300 test queries
x 20 BM25 candidates, so their per-query values can be averaged and the queries resampled jointly: that
gives the share of the two-seed mean drop recovered, 1 - mean_s drop_after_s / mean_s drop_before_s,
with the interval `matryoshka effects` uses (pipeline/effects.py). It also prints, per exit, the
difference between the seeds' drops after compensation (paired over queries): whether the seeds
really differ or only their point estimates do.

Per seed four scores files of scripts/fusion_eval.py (before: ratio 1, ratio r; after: ratio 1, ratio r),
as for compensation300.py:

    python docs/results/compensation-mse/two_seeds300.py -p params300.yaml \
        --seed 7 B1 BR A1 AR --seed 42 B1 BR A1 AR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "docs" / "results" / "scifact-cpu-rank64-1200"))

from matryoshka_reranker.config import load_params  # noqa: E402
from matryoshka_reranker.pipeline import statistics  # noqa: E402
from matryoshka_reranker.pipeline.effects import _bootstrap_recovered  # noqa: E402
from matryoshka_reranker.pipeline.evaluation import load_eval_set  # noqa: E402
from eval300 import load_scores  # noqa: E402

ROLES = ("before_1", "before_r", "after_1", "after_r")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("--seed", nargs=5, action="append", required=True,
                        metavar=("LABEL", "BEFORE_R1", "BEFORE_R", "AFTER_R1", "AFTER_R"))
    parser.add_argument("--resamples", type=int, default=10000)
    args = parser.parse_args()
    if len(args.seed) < 2:
        raise SystemExit("give --seed at least twice")

    params = load_params(args.params)
    queries, qrels = load_eval_set(params)
    ids = [q.query_id for q in queries]
    values: dict[tuple[str, str, int], np.ndarray] = {}  # (seed, role, exit) -> nDCG@10 per query
    ratio = None
    for label, *files in args.seed:
        for role, path in zip(ROLES, files):
            saved, by_exit = load_scores(Path(path), queries, qrels, ["nDCG@10"])
            if role.endswith("_r"):
                ratio = ratio or saved["ratio"]
                if saved["ratio"] != ratio:
                    raise SystemExit(f"{path}: ratio {saved['ratio']}, expected {ratio}")
            elif saved["ratio"] != 1:
                raise SystemExit(f"{path}: ratio {saved['ratio']}, expected 1")
            for k, measures in by_exit.items():
                values[(label, role, int(k))] = np.array([measures["nDCG@10"][q] for q in ids])
    labels = [s[0] for s in args.seed]
    n_seeds = {2: "two", 3: "three"}.get(len(labels), str(len(labels)))
    exits = sorted({k for (_, _, k) in values})
    print(f"{len(ids)} queries, ratio {ratio} against ratio 1, seeds {', '.join(labels)} "
          f"(per-query nDCG@10 averaged over the seeds; queries resampled jointly, {args.resamples} resamples)\n")
    print(f"| exit | mean drop before [95% CI] | mean drop after [95% CI] | recovered, {n_seeds}-seed mean [95% CI] | "
          + " | ".join(f"seed {s}: drop after" for s in labels) + f" | drop after, seed {labels[0]} - seed {labels[1]} [95% CI] |")
    print("|---|---|---|---|" + "---|" * len(labels) + "---|")
    for k in exits:
        mean = {role: np.mean([values[(s, role, k)] for s in labels], axis=0) for role in ROLES}
        db = statistics.paired_difference(mean["before_1"], mean["before_r"], 0.95, args.resamples)
        da = statistics.paired_difference(mean["after_1"], mean["after_r"], 0.95, args.resamples)
        rec = _bootstrap_recovered(mean["before_1"], mean["before_r"], mean["after_1"], mean["after_r"], args.resamples)
        per_seed = [float(np.mean(values[(s, "after_1", k)] - values[(s, "after_r", k)])) for s in labels]
        a, b = labels[0], labels[1]
        between = statistics.paired_difference(values[(a, "after_1", k)] - values[(a, "after_r", k)],
                                               values[(b, "after_1", k)] - values[(b, "after_r", k)], 0.95, args.resamples)
        print(f"| {k} | {db.mean:+.3f} [{db.low:+.3f}, {db.high:+.3f}] | {da.mean:+.3f} [{da.low:+.3f}, {da.high:+.3f}] | "
              f"{rec['recovered']:.2f} [{rec['recovered_ci'][0]:.2f}, {rec['recovered_ci'][1]:.2f}] | "
              + " | ".join(f"{d:+.3f}" for d in per_seed)
              + f" | {between.mean:+.3f} [{between.low:+.3f}, {between.high:+.3f}] (p {between.p_value:.3f}) |")
    if len(labels) > 2:  # each seed on its own, with the same interval, beside the pooled share above
        print("\n| exit | " + " | ".join(f"seed {s}: drop before / after, recovered [95% CI]" for s in labels) + " |")
        print("|---|" + "---|" * len(labels))
        for k in exits:
            cells = []
            for s in labels:
                v = {role: values[(s, role, k)] for role in ROLES}
                rec = _bootstrap_recovered(v["before_1"], v["before_r"], v["after_1"], v["after_r"], args.resamples)
                cells.append(f"{np.mean(v['before_1'] - v['before_r']):+.3f} / {np.mean(v['after_1'] - v['after_r']):+.3f}, "
                             f"{rec['recovered']:.2f} [{rec['recovered_ci'][0]:.2f}, {rec['recovered_ci'][1]:.2f}]")
            print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
