"""Training loss of the bf16-autocast run against the fp32 run, step by step (same seeds, same batches).

    python docs/results/scifact-cpu-rank64-1200-bf16/compare_losses.py \
        --bf16 <bf16 run>/models/self_distill/training_log.json \
        --fp32 docs/results/scifact-cpu-rank64-1200/training_log.txt

Prints, per window of steps, the mean summed loss and exits 8 / 16 / 30 of each run, their ratio, and
the per-step correlation of the summed loss (the batches are identical, so the two curves should move
together step by step if bf16 only adds rounding).
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import numpy as np


def steps_of(path: Path) -> list[dict]:
    if path.suffix == ".json":
        history = json.loads(path.read_text())["log_history"]
    else:  # the Trainer's printed dicts, one per line
        history = [ast.literal_eval(line) for line in path.read_text().splitlines() if line.startswith("{'loss'")]
    return [{k: float(v) for k, v in h.items() if k == "loss" or k.startswith("loss_exit_")} for h in history if "loss" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16", type=Path, required=True)
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--window", type=int, default=200)
    args = parser.parse_args()
    bf16, fp32 = steps_of(args.bf16), steps_of(args.fp32)
    n = min(len(bf16), len(fp32))
    print(f"# {n} steps in both logs (bf16 {len(bf16)}, fp32 {len(fp32)}); mean loss per window, bf16 / fp32")
    keys = ["loss", "loss_exit_08", "loss_exit_16", "loss_exit_30"]
    print(f"{'steps':>11s} " + " ".join(f"{k:>26s}" for k in keys))
    for start in range(0, n, args.window):
        cells = []
        for k in keys:
            b = np.mean([s[k] for s in bf16[start:start + args.window]])
            f = np.mean([s[k] for s in fp32[start:start + args.window]])
            cells.append(f"{b:8.3f} / {f:8.3f} ({b / f:5.3f})")
        print(f"{start + 1:>5d}-{min(n, start + args.window):<5d} " + " ".join(f"{c:>26s}" for c in cells))
    total = [np.corrcoef([s[k] for s in bf16[:n]], [s[k] for s in fp32[:n]])[0, 1] for k in keys]
    print("per-step Pearson r, bf16 vs fp32: " + ", ".join(f"{k} {r:.3f}" for k, r in zip(keys, total)))


if __name__ == "__main__":
    main()
