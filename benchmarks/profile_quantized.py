"""Where a quantized exit spends its time: ONNX Runtime's per-op-type profile of the fp32 exit graph and
of its quantized copy, on one batch of eval pairs.

    python -m benchmarks.profile_quantized [--params params.yaml] [--exit 8] [--scheme int8-token] [--batch 16]

The quantized copy is made by ``quantize_model`` as ``bench_quantize`` makes it (the scheme's default fp32
parts, ``export.quantize_smoothing`` from the export's training pairs, ``quantization_pairs``). Prints each graph's wall time per batch (mean
of 5 runs after 3 warm-up runs, with profiling on, so slightly slower than a plain run) and the share of
kernel time per op type. Why: the speed-up of ``int8-token`` is bounded by the work around its integer
GEMMs (the per-token quantization of each input, the row scale and centre applied to each output), and
this shows how much that is.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import quantization_inputs
from matryoshka_reranker.pipeline.export import quantization_batches, quantization_pairs
from matryoshka_reranker.pipeline.quantize import SCHEMES, quantize_model
from matryoshka_reranker.serving.artifacts import exit_model_file, ratio_folder
from matryoshka_reranker.serving.onnx_runtime import OnnxReranker


def profile(path: Path, feed: dict, threads: int, label: str, top: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling, options.log_severity_level = threads, True, 3
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"profile_{label}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: feed[i.name] for i in session.get_inputs()}
    for _ in range(3):
        session.run(None, feed)
    started = time.perf_counter()
    for _ in range(5):
        session.run(None, feed)
    wall = (time.perf_counter() - started) / 5
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    print(f"## {label}: {wall * 1000:.1f} ms per batch; kernel time by op type over {runs} runs")
    for op, micros in by_op.most_common(top):
        print(f"  {op:24s} {100 * micros / total:5.1f}%  {micros / runs / 1000:7.2f} ms per run")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--exit", type=int, default=8)
    parser.add_argument("--scheme", default="int8-token", choices=SCHEMES)
    parser.add_argument("--batch", type=int, default=16, help="pairs per batch (the first eval queries' candidates)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()
    params, queries, _, _ = quantization_inputs(args.params)
    folder = Path(params.paths.onnx) / ratio_folder(1)
    fp32 = OnnxReranker(folder, args.exit, threads=args.threads, batch_size=args.batch)
    pairs = [p for q in queries for p in q.pairs][: args.batch]
    feed = fp32.encoder.collate_numpy(fp32.encoder.encode_many(pairs))
    feeds = quantization_batches(fp32.encoder, quantization_pairs(params))  # the export's own pairs
    print(f"# exit {args.exit}, {len(pairs)} pairs padded to {feed['input_ids'].shape[1]} tokens, {args.threads} threads")
    base = profile(folder / exit_model_file(args.exit), feed, args.threads, "fp32", args.top)
    with tempfile.TemporaryDirectory(dir=folder.parent.parent) as work:
        target = Path(work) / "quantized.onnx"
        quantize_model(folder / exit_model_file(args.exit), target, args.scheme, None, calibration=feeds,
                       smoothing=params.export.quantize_smoothing)
        quantized = profile(target, feed, args.threads, args.scheme, args.top)
    print(f"speed-up {base / quantized:.2f}x (this batch, profiling on)")


if __name__ == "__main__":
    main()
