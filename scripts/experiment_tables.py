"""Markdown tables of a finished experiment (the README's "Quality" tables), read at a git revision.

    python scripts/experiment_tables.py scifact-cpu [--normal scifact-cpu-normal] [--png-out docs/images]

REV is an experiment name (``dvc exp show``) or any git revision whose commit holds the metrics
files (an experiment's ref holds them: they are ``cache: false`` outputs). Prints: quality per exit x
ratio with 95% intervals next to BM25 / random / untrained, the learning curve, the compensation
effect, and (with ``--normal``) cascaded self-distillation vs plain cross-entropy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def resolve(rev: str) -> str:
    """An experiment name -> its commit (via `dvc exp show`), else the revision itself."""
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=ROOT, capture_output=True,
                           text=True)
    if shown.returncode == 0:
        for base in json.loads(shown.stdout or "[]"):
            for exp in base.get("experiments") or []:
                for rev_info in exp.get("revs", []):
                    if rev_info.get("name") == rev:
                        return rev_info["rev"]
    return rev


def at(rev: str, path: str) -> dict:
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"{rev}:{path}: {shown.stderr.strip()}")
    return json.loads(shown.stdout)


def cell(entry: dict, measure: str) -> str:
    return f"{entry[measure]:.3f} [{entry[measure + '_ci'][0]:.3f}, {entry[measure + '_ci'][1]:.3f}]"


def diff(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev")
    parser.add_argument("--normal", default=None, help="the train_method=normal experiment, for the comparison")
    parser.add_argument("--png-out", default=None, help="copy the learning-curve PNG here")
    args = parser.parse_args()
    rev = resolve(args.rev)
    metrics = at(rev, "metrics/per_layer.json")
    ev = metrics["eval"]
    measures = ["nDCG@10", "RR@10", "R@10"]
    print(f"### Quality ({ev['queries']} test queries x {ev['candidates']} BM25 candidates, mean [95% bootstrap interval])\n")
    print("| config | " + " | ".join(measures) + " | vs BM25 (nDCG@10) | vs untrained | ms/query |")
    print("|---|---|---|---|---|---|---|")
    for name in ("random", "bm25"):
        base = metrics["baselines"][name]
        print(f"| {name} order | " + " | ".join(cell(base, m) for m in measures) + " | | | |")
    for name, entry in metrics["configs"].items():
        untrained = entry.get("vs_untrained", {}).get("nDCG@10")
        print(f"| {name} | " + " | ".join(cell(entry, m) for m in measures) + f" | {diff(entry['vs_bm25']['nDCG@10'])} | "
              f"{diff(untrained) if untrained else '-'} | {entry['latency_ms_per_query']:.0f} |")
    if "untrained" in metrics["baselines"]:
        print("\nUntrained model (\"Yes\" logit), nDCG@10: " + ", ".join(
            f"{n.split('-ratio')[0]} {v['nDCG@10']:.3f}" for n, v in metrics["baselines"]["untrained"].items()))
    print()
    curve = at(rev, "metrics/learning_curve.json")
    steps = sorted({p["step"] for p in curve["points"]})
    exits = sorted({p["exit_layer"] for p in curve["points"]})
    print("### Learning curve (self-distillation only, ratio 1, nDCG@10)\n")
    print("| step | " + " | ".join(f"exit {k}" for k in exits) + " |")
    print("|---" * (len(exits) + 1) + "|")
    for step in steps:
        row = {p["exit_layer"]: p for p in curve["points"] if p["step"] == step}
        print(f"| {step} | " + " | ".join(cell(row[k], "nDCG@10") if k in row else "-" for k in exits) + " |")
    effects = at(rev, "metrics/effects.json")
    if effects.get("compensation"):
        print("\n### Compensation: nDCG@10 drop of ratio r against ratio 1, before and after the adapters\n")
        print("| exit | ratio | before: r1 / r | drop before | after: r1 / r | drop after | recovered |")
        print("|---|---|---|---|---|---|---|")
        for row in effects["compensation"]:
            r = row["ratio"]
            b, a = row["before"], row["after"]
            # a share of the drop is only meaningful where there was a drop to recover
            recovered = (f"{row['recovered']:.2f} [{row['recovered_ci'][0]:.2f}, {row['recovered_ci'][1]:.2f}]"
                         if b["drop"]["low"] > 0 else "- (no significant drop before)")
            print(f"| {row['exit_layer']} | {r} | {b['ratio_1']:.3f} / {b[f'ratio_{r}']:.3f} | {diff(b['drop'])} | "
                  f"{a['ratio_1']:.3f} / {a[f'ratio_{r}']:.3f} | {diff(a['drop'])} | {recovered} |")
    if args.normal:
        from matryoshka_reranker.pipeline.effects import compare_runs

        other = at(resolve(args.normal), "metrics/learning_curve.json")
        print("\n### Cascaded self-distillation vs plain cross-entropy (final step, ratio 1, nDCG@10)\n")
        print("| exit | distill_fix_layer_teacher | normal | difference [95% CI] | p |")
        print("|---|---|---|---|---|")
        for row in compare_runs(curve, other, exits):
            d = row["difference"]
            print(f"| {row['exit_layer']} | {row['a']:.3f} | {row['b']:.3f} | {diff(d)} | {d['p_value']:.3g} |")
    if args.png_out:
        png = subprocess.run(["git", "show", f"{rev}:metrics/learning_curve.png"], cwd=ROOT, capture_output=True)
        out = Path(args.png_out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.rev}-learning-curve.png").write_bytes(png.stdout)


if __name__ == "__main__":
    main()
