"""End-to-end pairs/s of ``compute_score`` with per-pair against batched encoding (a GPU question).

    python -m benchmarks.bench_encode_e2e --model FOLDER [--batch-sizes 64 256] [--exits 8 30]

On a GPU the model is fast enough that host-side tokenization bounds scoring; this runs both
encoders round-robin (best of 2 each) at each exit, attention implementation and batch size, on the
same SciFact pairs. On the 2-core CPU the model dominates and both give the same pairs/s.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import scifact_pairs
from matryoshka_reranker import MatryoshkaReranker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--exits", type=int, nargs="+", default=[8, 30])
    parser.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "auto"])
    args = parser.parse_args()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    pairs = scifact_pairs(args.pairs)
    print(f"{len(pairs)} pairs on {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}, dtype {args.dtype}")
    for size in args.batch_sizes:
        reranker = MatryoshkaReranker(args.model, batch_size=size, dtype=args.dtype)
        batched = reranker.encoder.encode_many
        encoders = {"per-pair": lambda ps: [batched([p])[0] for p in ps], "batched": batched}
        for k in args.exits:
            for implementation in ("sdpa", "eager"):
                reranker.model.config._attn_implementation = implementation
                rates: dict[str, float] = {}
                for _ in range(2):
                    for name, encode in encoders.items():
                        reranker.encoder.encode_many = encode
                        reranker.compute_score(pairs[:size], cutoff_layers=[k])  # warm-up
                        sync()
                        started = time.perf_counter()
                        reranker.compute_score(pairs, cutoff_layers=[k])
                        sync()
                        rates[name] = max(rates.get(name, 0.0), len(pairs) / (time.perf_counter() - started))
                print(f"batch {size} exit {k} {implementation}: per-pair {rates['per-pair']:.0f}, batched "
                      f"{rates['batched']:.0f} pairs/s ({rates['batched'] / rates['per-pair']:.2f}x)", flush=True)
        reranker.encoder.encode_many = batched


if __name__ == "__main__":
    main()
