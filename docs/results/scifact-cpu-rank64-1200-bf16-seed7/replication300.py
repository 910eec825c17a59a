"""Two training seeds of one recipe on all 300 SciFact test queries x 20 BM25 candidates: does "above
BM25" replicate? (docs/quality.md, "A second seed"; the analysis was fixed in
configs/experiments/scifact-cpu-rank64-1200-bf16-seed7.yaml before the run.)

    python docs/results/scifact-cpu-rank64-1200-bf16-seed7/replication300.py -p params300.yaml \
        --a ../scifact-cpu-rank64-1200-bf16/scores300_layer400_w8_fp32.json --b scores300_seed7_fp32.json

Per exit, paired over queries (bootstrap 95% interval, sign-flip p): each seed - BM25, the recipe
(per-query mean of the two seeds' nDCG@10) - BM25, seed b - seed a; Holm's adjustment over the exits
for the "- BM25" rows.

Any number of seeds (the three-seed reading of docs/quality.md): add `--seed LABEL SCORES.json` for each
seed after the first two; the recipe row is then the per-query mean of all of them, and every later seed is
compared with seed a. With --a and --b alone the output is what it was for two seeds.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "src"))

from matryoshka_reranker.config import load_params  # noqa: E402
from matryoshka_reranker.pipeline import statistics  # noqa: E402
from matryoshka_reranker.pipeline.evaluation import first_stage_per_query, load_eval_set  # noqa: E402

_spec = importlib.util.spec_from_file_location("eval300", HERE.parent / "scifact-cpu-rank64-1200" / "eval300.py")
eval300 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval300)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("--a", type=Path, required=True, help="scores of the first seed (fusion_eval --scores-out)")
    parser.add_argument("--b", type=Path, required=True, help="scores of the second seed, same eval set")
    parser.add_argument("--seed", nargs=2, action="append", default=[], metavar=("LABEL", "SCORES"),
                        help="a further seed's label and scores (repeatable)")
    parser.add_argument("--measure", default="nDCG@10")
    parser.add_argument("--resamples", type=int, default=10000)
    args = parser.parse_args()

    queries, qrels = load_eval_set(load_params(args.params))
    ids = [q.query_id for q in queries]
    m = args.measure
    seeds = {"a": args.a, "b": args.b} | {label: Path(path) for label, path in args.seed}
    if len(seeds) != 2 + len(args.seed):
        parser.error("seed labels must differ from each other and from 'a' and 'b'")
    per_seed = {label: eval300.load_scores(path, queries, qrels, [m])[1] for label, path in seeds.items()}
    bm25 = first_stage_per_query(queries, qrels, [m])[m]
    exits = sorted(set.intersection(*(set(s) for s in per_seed.values())), key=int)
    recipe = "recipe (mean of a, b)" if len(seeds) == 2 else f"recipe (mean of {', '.join(seeds)})"
    print(f"{len(ids)} queries, {m}; BM25 {sum(bm25[q] for q in ids) / len(ids):.3f}")
    rows: dict[str, list] = {f"seed {label} - BM25": [] for label in seeds} | {f"{recipe} - BM25": []}
    for k in exits:
        values = {label: [s[k][m][q] for q in ids] for label, s in per_seed.items()}
        pooled = [sum(v) / len(v) for v in zip(*values.values())]
        base = [bm25[q] for q in ids]
        for label, v in values.items():
            rows[f"seed {label} - BM25"].append((k, statistics.paired_difference(v, base, 0.95, args.resamples)))
        rows[f"{recipe} - BM25"].append((k, statistics.paired_difference(pooled, base, 0.95, args.resamples)))
    print("| comparison | exit | difference [95% CI] | p | Holm p (over exits) |")
    print("|---|---|---|---|---|")
    for label, cells in rows.items():
        adjusted = holm([d.p_value for _, d in cells])
        for (k, d), p_adj in zip(cells, adjusted):
            print(f"| {label} | {k} | {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | {d.p_value:.3f} | {p_adj:.3f} |")
    a = per_seed["a"]
    for label, b in list(per_seed.items())[1:]:
        print(f"\n| exit | seed a | seed {label} | {label} - a [95% CI] | p |\n|---|---|---|---|---|")
        for k in exits:
            A, B = [a[k][m][q] for q in ids], [b[k][m][q] for q in ids]
            d = statistics.paired_difference(B, A, 0.95, args.resamples)
            print(f"| {k} | {sum(A) / len(A):.3f} | {sum(B) / len(B):.3f} | "
                  f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | {d.p_value:.3f} |")
    deepest = exits[-1]
    for label, s in per_seed.items():
        for k in exits[:-1]:
            d = statistics.paired_difference([s[k][m][q] for q in ids], [s[deepest][m][q] for q in ids],
                                             0.95, args.resamples)
            print(f"seed {label}: exit {k} - exit {deepest}: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")

if __name__ == "__main__":
    main()
