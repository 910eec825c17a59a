"""How much of a scoring batch is padding: the most a packed (varlen, padding-free) path could save.

    python -m benchmarks.padding_share [-p params.yaml] [--batch-sizes 16 32 64]

Encodes every pair of the params' evaluation set with the pipeline's input format and counts the
padded tokens of the batches ``compute_score`` builds (pairs sorted by length, longest first), against
the same pairs in their given order. No timing: a packed path removes at most this share of the token
rows every GEMM processes.
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from matryoshka_reranker.config import load_params
from matryoshka_reranker.core.assets import resolve_model_path
from matryoshka_reranker.pipeline.evaluation import load_eval_set


def padding_share(lengths: list[int], batch_size: int) -> float:
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    padded = sum(max(b) * len(b) for b in batches)
    return (padded - sum(lengths)) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    args = parser.parse_args()
    params = load_params(args.params)
    queries, _ = load_eval_set(params)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(params.model.name_or_path))
    encoder = params.model.input_format.encoder(tokenizer)
    given = [len(e.input_ids) for e in encoder.encode_many([p for q in queries for p in q.pairs])]
    ordered = sorted(given, reverse=True)
    print(f"# {len(given)} pairs of {len(queries)} eval queries, {sum(given)} real tokens, lengths "
          f"{min(given)}..{max(given)} (query <= {params.model.query_max_len}, passage <= {params.model.passage_max_len} tokens)")
    print(f"{'batch':>5s} {'padding, sorted by length (compute_score)':>42s} {'padding, given order':>21s}")
    for size in args.batch_sizes:
        print(f"{size:5d} {100 * padding_share(ordered, size):41.2f}% {100 * padding_share(given, size):20.2f}%")


if __name__ == "__main__":
    main()
