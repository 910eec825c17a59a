"""``MatryoshkaReranker(compile=True)`` against eager, end to end through ``compute_score``.

    python -m benchmarks.bench_compile [--model embedded:smollm2-135m-instruct] [--pairs 64] [--rounds 3] [--dtype auto]

Two rerankers on the same weights, one with its decoder layers under ``torch.compile`` (dynamic
shapes, compiled once at construction: the extra construction time over the eager reranker's is
printed, what a server pays at start-up; run with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` for a
cold compile, else Inductor's on-disk cache may serve it), score the same real SciFact pairs at
several exits and widths with the mix of lengths ``compute_score`` builds (sorted by length, so
each batch has its own length), timed round-robin in one run. Prints pairs/s and compiled / eager
per config, and the largest score difference. ``--dtype`` is both rerankers' (default float32, as
the README's table; "auto" is ``MatryoshkaReranker``'s own default: bf16 on CPUs with AMX-BF16).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from benchmarks.common import interleaved_timing, machine_line, scifact_pairs
from matryoshka_reranker import MatryoshkaReranker
from matryoshka_reranker.model.inputs import InputFormat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--passage-max-len", type=int, default=96, help="the pipeline's default cut")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compress-layer", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    args = parser.parse_args()
    print(machine_line(), flush=True)

    options = dict(batch_size=args.batch_size, dtype=args.dtype, input_format=InputFormat(query_max_len=32,
                                                                        passage_max_len=args.passage_max_len))
    eager = MatryoshkaReranker(args.model, **options)  # first: pays the cold imports and file reads
    started = time.perf_counter()
    compiled = MatryoshkaReranker(args.model, compile=True, **options)
    construct = time.perf_counter() - started
    started = time.perf_counter()
    MatryoshkaReranker(args.model, **options)  # a warm eager construction, as warm as the compiled one's was
    construct -= time.perf_counter() - started  # (subtracting the cold first one understated the compile)
    if not compiled.compiled:
        raise SystemExit("torch.compile does not work here (see the warning above); nothing to compare")
    depth = eager.exit_layers[-1]
    pairs = scifact_pairs(args.pairs)
    configs = {f"exit {k:2d}, ratio 1": (k, 1) for k in (8, 16, depth) if k in eager.exit_layers}
    configs[f"exit {depth:2d}, ratio 4 @ layer {args.compress_layer}"] = (depth, 4)

    def run(reranker, layer: int, ratio: int):
        return lambda: reranker.compute_score(pairs, cutoff_layers=layer, compress_layers=[args.compress_layer],
                                              compress_ratio=ratio)

    worst = 0.0
    for layer, ratio in configs.values():  # agreement (the timing below warms up on its own)
        a, b = run(eager, layer, ratio)(), run(compiled, layer, ratio)()
        worst = max(worst, max(abs(x - y) for x, y in zip(a, b)))
    systems = {}
    for name, cfg in configs.items():
        systems[f"{name} | eager"] = run(eager, *cfg)
        systems[f"{name} | compiled"] = run(compiled, *cfg)
    seconds = interleaved_timing(systems, args.rounds)
    print(f"# {args.model}: {len(pairs)} SciFact pairs, batch {args.batch_size}, passages <= {args.passage_max_len} "
          f"tokens, {eager.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; compile at construction {construct:.1f} s; "
          f"largest |score difference| {worst:.2e}")
    print(f"{'configuration':32s} {'eager pairs/s':>14s} {'compiled pairs/s':>17s} {'compiled / eager':>17s}")
    for name in configs:
        e, c = seconds[f"{name} | eager"], seconds[f"{name} | compiled"]
        print(f"{name:32s} {len(pairs) / e:14.2f} {len(pairs) / c:17.2f} {e / c:16.2f}x")


if __name__ == "__main__":
    main()
