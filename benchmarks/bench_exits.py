"""Pairs/s of the PyTorch model at several exits and compression ratios, as ratios to full depth.

    python benchmarks/bench_exits.py [--model embedded:smollm2-135m-instruct] [--pairs 32] [--rounds 3]

Every configuration scores the same real SciFact pairs; configurations are timed round-robin in
one run, so the printed ratios compare like with like on this machine.
"""

from __future__ import annotations

import argparse
import platform

import torch

from benchmarks.common import interleaved_timing, machine_line, scifact_pairs
from matryoshka_reranker import MatryoshkaReranker
from matryoshka_reranker.model.inputs import InputFormat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--passage-max-len", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compress-layer", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                        help="auto: MatryoshkaReranker's default (bf16 on CPUs with AMX-BF16)")
    args = parser.parse_args()
    print(machine_line(), flush=True)

    reranker = MatryoshkaReranker(args.model, batch_size=args.batch_size, dtype=args.dtype,
                                  input_format=InputFormat(query_max_len=32, passage_max_len=args.passage_max_len))
    depth = reranker.exit_layers[-1]
    pairs = scifact_pairs(args.pairs)
    tokens = sum(len(reranker.encoder.encode(q, p).input_ids) for q, p in pairs) / len(pairs)
    configs = {f"exit {k:2d}, ratio 1": (k, 1) for k in (8, 16, 24, depth) if k in reranker.exit_layers}
    configs |= {f"exit {depth:2d}, ratio {r} @ layer {args.compress_layer}": (depth, r) for r in (2, 4, 8)}

    def run(layer: int, ratio: int):
        return lambda: reranker.compute_score(pairs, cutoff_layers=layer, compress_layers=[args.compress_layer],
                                              compress_ratio=ratio)

    seconds = interleaved_timing({name: run(*cfg) for name, cfg in configs.items()}, args.rounds)
    full = seconds[f"exit {depth:2d}, ratio 1"]
    print(f"# {args.model}: {len(pairs)} SciFact pairs, mean {tokens:.0f} tokens, batch {args.batch_size}, "
          f"{reranker.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'configuration':32s} {'pairs/s':>8s} {'speed vs full':>14s} {'ideal (depth)':>14s}")
    for name, (layer, ratio) in configs.items():
        ideal = f"{depth / layer:.2f}x" if ratio == 1 else "-"
        print(f"{name:32s} {len(pairs) / seconds[name]:8.2f} {full / seconds[name]:13.2f}x {ideal:>14s}")


if __name__ == "__main__":
    main()
