"""int8-token before and after the lean rewrite (one per-row QuantizeLinear, row scale inside the GEMM), side
by side in one run: agreement with fp32 and pairs/s of fp32, the previous rewrite and the current one.

    python docs/results/quantize-lean/compare_rewrites.py [--old-rev 9cdfb1b] [--queries 10] [--exits 8 16 30]

Run from the root of a checkout whose params point at an exported model (models/onnx). The previous rewrite
is read from git (``per_token_int8`` at --old-rev); both copies are made the same way as
``benchmarks/bench_quantize.py`` makes them (the scheme's default fp32 parts, export.quantize_smoothing from
the calibration pairs), so they differ only in the rewrite. Timing is round-robin (``interleaved_timing``;
the recorded runs used a fixed order, fp32, old, lean, per round; it takes interleaved_timing's order since: rotating, now a new seeded shuffle each round).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # benchmarks/ of the checkout it runs in

import numpy as np
from scipy.stats import spearmanr

from benchmarks.common import interleaved_timing, quantization_inputs
from matryoshka_reranker.pipeline.export import quantization_batches
from matryoshka_reranker.pipeline import quantize
from matryoshka_reranker.pipeline.calibration import in_calibration_half
from matryoshka_reranker.serving.artifacts import exit_model_file, ratio_folder
from matryoshka_reranker.serving.onnx_runtime import OnnxReranker, create_session


def old_rewrite(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:src/matryoshka_reranker/pipeline/quantize.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).parent).stdout
    module = types.ModuleType("quantize_old")
    exec(compile(source, f"quantize.py@{rev}", "exec"), module.__dict__)
    return module.per_token_int8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--old-rev", default="9cdfb1b")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--exits", type=int, nargs="+", default=[8, 16, 30])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    params, queries, _, calibration = quantization_inputs(args.params)
    queries = [q for q in queries if not in_calibration_half(q.query_id)][: args.queries]
    pairs = [p for q in queries for p in q.pairs]
    rewrites = {"old": old_rewrite(args.old_rev), "lean": quantize.per_token_int8}
    print(f"# {len(queries)} held-out eval queries x {len(queries[0].candidates)} candidates, {args.threads} threads, "
          f"{args.rounds} interleaved rounds; old = per_token_int8 at {args.old_rev}")
    print(f"{'exit':>4} {'rho old':>8} {'rho lean':>8} {'max|old-lean|':>13} {'fp32 p/s':>9} {'old p/s':>8} "
          f"{'lean p/s':>8} {'old x':>6} {'lean x':>6} {'lean/old':>8}")
    for k in args.exits:
        folder = Path(params.paths.onnx) / ratio_folder(1)
        fp32 = OnnxReranker(folder, k, threads=args.threads, batch_size=len(queries[0].candidates))
        encoded = fp32.encoder.encode_many(pairs)
        feeds = quantization_batches(fp32.encoder, calibration.pairs)
        sessions = {"fp32": fp32.session}
        with tempfile.TemporaryDirectory(dir=folder.parent.parent) as work:
            for name, rewrite in rewrites.items():
                target = Path(work) / f"{name}.onnx"
                original, quantize.per_token_int8 = quantize.per_token_int8, rewrite
                try:
                    quantize.quantize_model(folder / exit_model_file(k), target, "int8-token", None, calibration=feeds,
                                            smoothing=params.export.quantize_smoothing)
                finally:
                    quantize.per_token_int8 = original
                sessions[name] = create_session(target, ["CPUExecutionProvider"], args.threads)
            names = [i.name for i in fp32.session.get_inputs()]

            def run(session):
                out = []
                for q in queries:
                    batch = fp32.encoder.collate_numpy(encoded[len(out):len(out) + len(q.candidates)])
                    out += list(session.run(["scores"], {n: batch[n] for n in names})[0])
                return np.array(out)

            scores = {name: run(s) for name, s in sessions.items()}
            sizes = np.cumsum([0] + [len(q.candidates) for q in queries])

            def rho(name):
                return np.mean([spearmanr(scores["fp32"][a:b], scores[name][a:b]).statistic
                                for a, b in zip(sizes[:-1], sizes[1:])])

            seconds = interleaved_timing({name: (lambda s=s: run(s)) for name, s in sessions.items()}, args.rounds)
        rate = {name: len(pairs) / s for name, s in seconds.items()}
        print(f"{k:>4} {rho('old'):8.3f} {rho('lean'):8.3f} {np.abs(scores['old'] - scores['lean']).max():13.2e} "
              f"{rate['fp32']:9.2f} {rate['old']:8.2f} {rate['lean']:8.2f} {rate['old'] / rate['fp32']:5.2f}x "
              f"{rate['lean'] / rate['fp32']:5.2f}x {rate['lean'] / rate['old']:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
