"""The deepest layer run for the last token only vs the whole layer: PyTorch (default and packed) and ONNX Runtime.

    python -m benchmarks.bench_last_token [--pairs 16] [--rounds 5] [--threads 2]

A score reads one position, each row's last real token, so the deepest layer a call runs needs keys and
values for every token but the query, attention, output projection and MLP for that token alone
(``modeling.last_token_layer``; on SmolLM2-135M 6% of the layer's GEMM work per token). This times, round-robin
in one run (``benchmarks.common.interleaved_timing``), on the speed benchmarks' padded batch (16 SciFact pairs,
fp32), at exits 8 / 16 / 24 / 30, ratio 1:

* PyTorch default: ``MatryoshkaModel.advance(..., last_token_only=True)`` (what ``forward`` runs) vs ``False``;
* PyTorch packed: ``PackedForward`` with ``last_token_only`` True (shipped) vs False;
* ONNX Runtime: the exported ``exit-KK.onnx`` (cut from the last-token branch) vs the same export's all-exits
  graph cut to ``scores_KK`` alone (the full layer k, what every exit graph was before), both reading the
  same ``weights.bin``; sessions built as the library builds them, except that idle threads sleep
  (``--ort-spinning`` for ONNX Runtime's default): eight sessions' spinning pools would otherwise share the
  two cores with whichever system is being timed.

Each pair of systems is checked to give the same scores (1e-4) before timing. Expected: about 1/k faster at
exit k (12% at exit 8, 3% at exit 30); the ratios printed are what this CPU gives.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (as bench_onnx)

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import interleaved_timing, machine_line, padded_batch
from matryoshka_reranker.model.inputs import InputFormat
from matryoshka_reranker.model.packed import PackedForward
from matryoshka_reranker.pipeline.export import ExportOptions, _cut_outputs, export_models
from matryoshka_reranker.serving.artifacts import ALL_EXITS_FILE, SCORES, WEIGHTS_FILE, exit_model_file, ratio_folder

MODEL = "embedded:smollm2-135m-instruct"
EXITS = [8, 16, 24, 30]
FORMAT = InputFormat(query_max_len=64, passage_max_len=160)  # padded_batch's


def whole_layer_graph(all_exits: Path, exit_layer: int) -> Path:
    """``all_exits`` cut to exit k's score alone, beside it (so it reads the same weights file), as the export cuts."""
    target = all_exits.with_name(f"whole-{exit_layer:02d}.onnx")
    _cut_outputs(all_exits, [f"{SCORES}_{exit_layer}"], target, weights=WEIGHTS_FILE)
    return target


def ort_session(path: Path, threads: int, spinning: bool):
    """As ``serving.onnx_runtime.create_session`` builds it (all graph optimisations, CPU), spinning as asked."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ort-spinning", action=argparse.BooleanOptionalAction, default=False,
                        help="let ONNX Runtime's idle threads spin (its default): off by default here, since eight "
                             "sessions' spinning pools share the 2 cores with the system being timed")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    torch.set_num_threads(args.threads)
    reranker, batch = padded_batch(MODEL, args.pairs)
    model, size = reranker.model, args.pairs
    mask = batch["attention_mask"]
    print(f"# {MODEL}: {size} SciFact pairs, {int(mask.sum())} real tokens padded to {mask.shape[1]}, fp32, "
          f"{args.threads} threads, {args.rounds} rounds, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"ONNX Runtime spinning {'on' if args.ort_spinning else 'off'}", flush=True)

    def default(k: int, last_token_only: bool):
        def call():
            with torch.inference_mode():
                state = model.embed(batch["input_ids"], mask, batch["query_lengths"], batch["prompt_lengths"])
                return model.advance(state, k, {k}, last_token_only=last_token_only)[1][k]
        return call

    trimmed, whole = PackedForward(model), PackedForward(model)
    whole.last_token_only = False

    def packed(k: int, forward: PackedForward):
        def call():
            with torch.inference_mode():
                return forward(batch["input_ids"], mask, [k])[0]
        return call

    work = Path(tempfile.mkdtemp(prefix="bench-last-token-"))
    try:
        export_models(MODEL, work, EXITS, [1], [], options=ExportOptions(input_format=FORMAT))
        folder = work / ratio_folder(1)
        feed = {"input_ids": batch["input_ids"].numpy(), "attention_mask": mask.numpy()}

        def ort(path: Path):
            session = ort_session(path, args.threads, args.ort_spinning)
            return lambda: session.run([SCORES if path.name.startswith("exit-") else session.get_outputs()[0].name],
                                       feed)[0]

        systems = {}
        for k in EXITS:
            systems[("default", "whole", k)], systems[("default", "last", k)] = default(k, False), default(k, True)
            systems[("packed", "whole", k)], systems[("packed", "last", k)] = packed(k, whole), packed(k, trimmed)
            systems[("ORT", "whole", k)] = ort(whole_layer_graph(folder / ALL_EXITS_FILE, k))
            systems[("ORT", "last", k)] = ort(folder / exit_model_file(k))
        diffs = {}
        for (kind, variant, k), call in systems.items():
            if variant == "last":
                got, want = (np.asarray(f(), dtype=np.float64) for f in (call, systems[(kind, "whole", k)]))
                diffs[(kind, k)] = float(np.abs(got - want).max())
                if not diffs[(kind, k)] <= 1e-4:
                    raise SystemExit(f"{kind} exit {k}: last-token scores differ from the whole layer's by "
                                     f"{diffs[(kind, k)]:.3g}")
        seconds = interleaved_timing(systems, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'path':8s} {'exit':>4s} {'whole pairs/s':>13s} {'last-token pairs/s':>18s} {'speed-up':>8s} "
          f"{'ideal':>6s} {'max|diff|':>9s}")
    for kind in ("default", "packed", "ORT"):
        for k in EXITS:
            w, t = seconds[(kind, "whole", k)], seconds[(kind, "last", k)]
            print(f"{kind:8s} {k:4d} {size / w:13.2f} {size / t:18.2f} {w / t:7.3f}x {k / (k - 0.94):5.3f}x "
                  f"{diffs[(kind, k)]:9.1e}")
    print("# ideal: k / (k - 0.94), the layer's GEMM work left at the deepest layer (6% of it) on SmolLM2-135M")


if __name__ == "__main__":
    main()
