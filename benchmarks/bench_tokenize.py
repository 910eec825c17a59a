"""Pairs/s of the pair encoder: one tokenizer call per pair against one batched call per text kind.

    python -m benchmarks.bench_tokenize [--pairs 1024] [--rounds 5]

Why: on an H200 the PyTorch path scored about 1,000 pairs/s at exit 8 and at exit 30 alike, the
rate per-pair tokenization alone reached there (README, GPU): the tokenizer, not the model, bounded
GPU scoring. Both encoders run round-robin in one run on the same SciFact pairs and must give the
same ids; the ratio is what the batched call buys on this machine.
"""

from __future__ import annotations

import argparse
import os

from benchmarks.common import interleaved_timing, scifact_pairs
from matryoshka_reranker.core.assets import resolve_model_path
from matryoshka_reranker.model.inputs import PairEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    encoder = PairEncoder(AutoTokenizer.from_pretrained(resolve_model_path(args.model)))
    pairs = scifact_pairs(args.pairs)
    per_pair = [encoder.encode(q, p) for q, p in pairs]
    if per_pair != encoder.encode_many(pairs):
        raise SystemExit("batched and per-pair encodings differ")
    times = interleaved_timing({"per pair": lambda: [encoder.encode(q, p) for q, p in pairs],
                                "batched": lambda: encoder.encode_many(pairs)}, args.rounds)
    print(f"{len(pairs)} SciFact pairs, {os.cpu_count()} CPUs, TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}, median of {args.rounds} interleaved rounds")
    for name, seconds in times.items():
        print(f"{name:9s} {len(pairs) / seconds:8.0f} pairs/s  ({times['per pair'] / seconds:.2f}x per pair)")


if __name__ == "__main__":
    main()
