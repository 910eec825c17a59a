"""How closely ratio r's scores follow ratio 1's, per exit, before and after the width (token) adapter.

nDCG@10 recovery ratios divide two small, noisy drops; this looks at the scores themselves. For each
pair of score files of ``scripts/fusion_eval.py`` (same 300-query eval set, 20 candidates per query):
the mean over queries of Spearman's rho between the compressed and the uncompressed scores of the query's
candidates, the within-query RMSE (each query's mean removed: a per-query offset does not change a
ranking) and the uncompressed scores' mean within-query standard deviation (the scale the RMSE is on).

    python docs/results/compensation-mse/agreement300.py \
        --pair "self-distilled" SD_R4.json SD_R1.json \
        --pair "layer adapter only" LAYERONLY_R4.json STACK_R1.json \
        --pair "+ token adapter" STACK_R4.json STACK_R1.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import spearmanr


def load(path: str) -> dict:
    return json.load(open(path, encoding="utf-8"))


def _per_query(compressed: dict, full: dict, exit_layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Both files' scores at one exit as (queries, candidates) arrays, refused unless over the same queries."""
    if compressed["query_ids"] != full["query_ids"]:
        raise SystemExit("the two score files are not over the same queries in the same order")
    n = len(full["query_ids"])
    return (np.asarray(compressed["scores"][exit_layer]).reshape(n, -1),
            np.asarray(full["scores"][exit_layer]).reshape(n, -1))


def per_query_rho(compressed: dict, full: dict, exit_layer: str) -> np.ndarray:
    """Spearman's rho between the two files' scores of each query's candidates, one value per query."""
    a, b = _per_query(compressed, full, exit_layer)
    return np.array([spearmanr(x, y)[0] for x, y in zip(a, b)])


def agreement(compressed: dict, full: dict, exit_layer: str) -> tuple[float, float, float]:
    a, b = _per_query(compressed, full, exit_layer)
    rho = float(per_query_rho(compressed, full, exit_layer).mean())
    centred = (a - a.mean(1, keepdims=True)) - (b - b.mean(1, keepdims=True))
    return rho, float(np.sqrt((centred ** 2).mean())), float(b.std(1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LABEL", "COMPRESSED", "FULL"))
    args = parser.parse_args()
    pairs = [(label, load(c), load(f)) for label, c, f in args.pair]
    exits = [e for e in pairs[0][2]["scores"]]
    print("| exit | " + " | ".join(f"{label}: rho / RMSE / sd" for label, _, _ in pairs) + " |")
    print("|---|" + "---|" * len(pairs))
    for e in exits:
        cells = ["%.3f / %.2f / %.2f" % agreement(c, f, e) for _, c, f in pairs]
        print(f"| {e} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
