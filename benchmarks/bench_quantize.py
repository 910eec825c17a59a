"""fp32 vs quantized ONNX exit models: ranking agreement (Spearman per query), nDCG@10, and speed.

    python -m benchmarks.bench_quantize [--queries 20] [--exits 8 16 30] [--schemes int8 int8-token:down_proj int4]
                                        [--smoothing 0 0.75]

For each exit (ratio 1), scheme and smoothing alpha, quantizes the exported exit model
(``pipeline/quantize.py``; activation statistics from training pairs, as the export takes them:
``quantization_pairs``; ``--calibration eval``: from the Platt half of the eval queries, the export's
source until 2026-12-07), scores the first N eval queries of the *other* half with both (``scheme:part+part``
keeps those parts in fp32 instead of the scheme's default), and prints the mean per-query Spearman
correlation with the fp32 scores, nDCG@10 of both, and pairs/s of both timed round-robin in one run.
``--rounds 0 --queries 0``: agreement only, on every held-out query, with 95% bootstrap intervals
(Spearman's mean over queries; nDCG@10 quantized - fp32, paired over queries).
Targets (issue): Spearman >= 0.98, nDCG@10 within 0.01, >= 1.5x fp32 pairs/s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import interleaved_timing, quantization_inputs
from matryoshka_reranker.pipeline.calibration import in_calibration_half
from matryoshka_reranker.pipeline.evaluation import per_query
from matryoshka_reranker.pipeline.export import quantization_batches, quantization_pairs
from matryoshka_reranker.pipeline.quantize import SCHEMES, quantize_model
from matryoshka_reranker.pipeline.statistics import aligned, mean_interval, paired_difference
from matryoshka_reranker.serving.artifacts import exit_model_file, ratio_folder
from matryoshka_reranker.serving.onnx_runtime import OnnxReranker, create_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--queries", type=int, default=20, help="first N held-out eval queries; 0: all of them")
    parser.add_argument("--exits", type=int, nargs="+", default=[8, 16, 30])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), help="scheme or scheme:part+part (kept fp32)")
    parser.add_argument("--keep-fp32", nargs="*", default=None, help="MatMul weights to keep in fp32 (default: "
                        "the scheme's own)")
    parser.add_argument("--smoothing", type=float, nargs="+", default=None,
                        help="SmoothQuant alphas to compare (default: export.quantize_smoothing)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; 0: agreement and nDCG only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", choices=["train", "eval"], default="train",
                        help="activation statistics from training pairs (the export's) or the eval queries' Platt half")
    args = parser.parse_args()
    params, queries, qrels, calibration = quantization_inputs(args.params)
    queries = [q for q in queries if not in_calibration_half(q.query_id)][: args.queries or None]
    smoothing = args.smoothing if args.smoothing is not None else [params.export.quantize_smoothing]
    qrels = {q.query_id: qrels[q.query_id] for q in queries}
    pairs = [p for q in queries for p in q.pairs]
    print(f"# {len(queries)} eval queries x {len(queries[0].candidates)} candidates ({len(pairs)} pairs), "
          f"{args.threads} threads; Spearman = mean over queries of rank correlation with the fp32 scores; "
          f"activation statistics from {'training pairs' if args.calibration == 'train' else 'the eval Platt half'}")
    print(f"{'exit':>4} {'scheme':>24} {'alpha':>5} {'kept fp32':>10} {'Spearman':>9} {'nDCG fp32':>10} {'nDCG q':>7} "
          f"{'pairs/s fp32':>12} {'pairs/s q':>10} {'speed-up':>9}")
    from scipy.stats import spearmanr

    def by_query(values):
        out, offset = {}, 0
        for q in queries:
            out[q.query_id] = list(values[offset:offset + len(q.candidates)])
            offset += len(q.candidates)
        return out

    for k in args.exits:
        folder = Path(params.paths.onnx) / ratio_folder(1)
        fp32 = OnnxReranker(folder, k, threads=args.threads, batch_size=len(queries[0].candidates))
        base = np.array(fp32.compute_score(pairs))
        ndcg_base_per_query = per_query(queries, by_query(base), qrels, ["nDCG@10"])["nDCG@10"]
        ndcg_base = np.mean(list(ndcg_base_per_query.values()))
        feeds = quantization_batches(fp32.encoder, quantization_pairs(params) if args.calibration == "train"
                                     else calibration.pairs)
        runs = [(spec, alpha) for spec in args.schemes
                for alpha in (smoothing if spec.partition(":")[0] in ("int8", "int8-token") else [0.0])]
        for spec, alpha in runs:
            scheme, _, parts = spec.partition(":")
            with tempfile.TemporaryDirectory(dir=folder.parent.parent) as work:
                target = Path(work) / "model.onnx"
                keep = tuple(args.keep_fp32) if args.keep_fp32 is not None else None
                keep = ("score_heads", *parts.split("+")) if parts else keep
                info = quantize_model(folder / exit_model_file(k), target, scheme, keep, calibration=feeds,
                                      smoothing=alpha)
                session = create_session(target, ["CPUExecutionProvider"], args.threads)
                names = [i.name for i in session.get_inputs()]
                encoded = [fp32.encoder.encode(q, p) for q, p in pairs]

                def run(sess, rows=range(len(encoded))):
                    out = []
                    for q in queries:
                        batch = fp32.encoder.collate_numpy(encoded[len(out):len(out) + len(q.candidates)])
                        out += list(sess.run(["scores"], {n: batch[n] for n in names})[0])
                    return np.array(out)

                quantized = run(session)
                rhos = [spearmanr(a, b).statistic for a, b in zip(by_query(base).values(), by_query(quantized).values())]
                rho = np.mean(rhos)
                ndcg_q_per_query = per_query(queries, by_query(quantized), qrels, ["nDCG@10"])["nDCG@10"]
                ndcg_q = np.mean(list(ndcg_q_per_query.values()))
                if args.rounds == 0:  # agreement only (e.g. on every held-out query), with 95% intervals
                    print(f"{k:>4} {spec:>24} {alpha:5.2f} {info['nodes_kept_fp32']:>10} {rho:9.3f} {ndcg_base:10.3f} "
                          f"{ndcg_q:7.3f} {'-':>12} {'-':>10} {'-':>9}", flush=True)
                    print(f"     Spearman {mean_interval(rhos)} (lowest query {min(rhos):.3f}); nDCG@10 quantized - "
                          f"fp32 {paired_difference(*aligned(ndcg_q_per_query, ndcg_base_per_query))}", flush=True)
                    continue
                seconds = interleaved_timing({"fp32": lambda: run(fp32.session), "q": lambda: run(session)}, args.rounds)
                print(f"{k:>4} {spec:>24} {alpha:5.2f} {info['nodes_kept_fp32']:>10} {rho:9.3f} {ndcg_base:10.3f} {ndcg_q:7.3f} "
                      f"{len(pairs) / seconds['fp32']:12.2f} {len(pairs) / seconds['q']:10.2f} "
                      f"{seconds['fp32'] / seconds['q']:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
