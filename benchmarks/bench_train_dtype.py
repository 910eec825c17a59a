"""One self-distillation step in fp32 vs bf16 on CPU: is a bf16 training path worth having?

    python -m benchmarks.bench_train_dtype [--rounds 3] [--group-size 8] [--train-method same_layer_mse]

The same LoRA model and batch as ``bench_train_step`` (embedded SmolLM2-135M, one group, our
shared-prefix step), three ways at ratios 1 and 4, round-robin in a new seeded order each round: fp32; fp32 weights under
``torch.autocast("cpu", bfloat16)`` (what a Trainer's ``bf16=True`` does); and what training with
``bf16_autocast: true`` runs: the same autocast with the frozen decoder projections stored in bf16 for the
run (``FrozenWeightsInBf16``; embeddings, norms, LoRA and heads stay fp32), which saves autocast's
per-use casts of frozen weights and gives the same loss as plain autocast. Prints each variant's fastest
step, the speed-up over fp32 and the loss (bf16 rounding moves it). On CPUs with AMX-BF16 a bf16 GEMM is
~8x fp32's, yet the step gains far less: the backward's non-GEMM work and the casts dominate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_train_step  # noqa: E402
from benchmarks.common import machine_line, round_orders  # noqa: E402
from matryoshka_reranker.training.trainer import FrozenWeightsInBf16  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-method", default="distill_fix_layer_teacher",
                        help="the step's loss (compensation's token adapters: same_layer_mse)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    build_args = argparse.Namespace(model="embedded:smollm2-135m-instruct", start_layer=4, compress_layer=8,
                                    group_size=args.group_size, batch=1, train_method=args.train_method)
    fp32, batch, _, layer = bench_train_step.build(build_args)
    frozen_bf16, _, _, _ = bench_train_step.build(build_args)
    FrozenWeightsInBf16(frozen_bf16.get_base_model().decoder.layers).cast()
    variants = {"fp32": (fp32, False), "bf16 autocast": (fp32, True),
                "bf16 autocast, frozen projections bf16": (frozen_bf16, True)}

    def step(name: str, ratio: int) -> tuple[float, float]:
        model, autocast = variants[name]
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch, compress_layers=[layer] if ratio > 1 else [], compress_ratio=ratio)
        out["loss"].float().backward()
        return time.perf_counter() - start, out["loss"].item()

    best, losses = {}, {}
    tasks = [(name, ratio) for ratio in (1, 4) for name in variants]
    for rnd, order in enumerate([tasks] + round_orders(tasks, args.rounds)):  # round 0 warms up; then a new
        for name, ratio in order:  # seeded order every round (fixed, fp32 always ran first, before autocast)
            seconds, losses[name, ratio] = step(name, ratio)
            if rnd:
                best[name, ratio] = min(best.get((name, ratio), float("inf")), seconds)
    print(f"# {args.train_method}, one group of {args.group_size}, tokens/row <= {batch['input_ids'].shape[1]}, compression at layer "
          f"{layer}, {torch.get_num_threads()} threads, fastest of {args.rounds} interleaved steps")
    print(f"{'variant':38s} {'ratio':>5s} {'s/step':>8s} {'vs fp32':>8s} {'loss':>10s}")
    for ratio in (1, 4):
        for name in variants:
            print(f"{name:38s} {ratio:5d} {best[name, ratio]:8.3f} {best['fp32', ratio] / best[name, ratio]:7.2f}x "
                  f"{losses[name, ratio]:10.4f}")


if __name__ == "__main__":
    main()
