"""ONNX Runtime vs our PyTorch path on the embedded SmolLM2 (CPU), every exit x ratio, side by side.

    python benchmarks/bench_onnx.py [--onnx DIR] [--pairs 32] [--rounds 3] [--threads 2] [--quick]

Without ``--onnx`` it first exports exits 8/16/24/30 x ratios 1/2/4 (compression at layer 8) of
the raw embedded model (heads from the "Yes" row: the same graphs and cost as a trained release)
and prints the export wall time per ratio and per configuration. Then, on the same real SciFact
pairs, timed round-robin in one run (``benchmarks.common.interleaved_timing``):

1. pairs/s of ``OnnxReranker`` and of ``MatryoshkaReranker`` (PyTorch eager mode, sdpa attention,
   fp32 as the exports) for every configuration, the ORT/PyTorch speed-up, and latency(exit k) /
   latency(exit 30) against the ideal k / 30 (ratio 1); where the CPU has AMX-BF16 (or with
   ``--bf16``) also PyTorch in bf16, ``MatryoshkaReranker``'s default there, and ORT / that;
2. unless ``--quick``, variants at exit 30 ratio 1: 1 vs N threads for both, ORT graph-optimisation
   level and spin-waiting, an sdpa-attention export, onnxscript's ORT transformer fusions, and our
   PyTorch path with eager attention.

``OMP_WAIT_POLICY`` defaults to PASSIVE here, as in the ``matryoshka`` CLI: with OpenMP's default
spin-waiting, PyTorch with 2 threads ran 2-6x slower on a shared 2-core machine, which would
flatter ONNX Runtime. Set ``OMP_WAIT_POLICY=ACTIVE`` to measure that case.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import logging
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import interleaved_timing, machine_line, scifact_pairs
from matryoshka_reranker import MatryoshkaReranker, OnnxReranker
from matryoshka_reranker.config import load_params
from matryoshka_reranker.core.hardware import cpu_has_amx_bf16
from matryoshka_reranker.pipeline.export import (
    ExportOptions,
    export_models,
)
from matryoshka_reranker.serving.artifacts import config_name, exit_model_file, ratio_folder
from matryoshka_reranker.serving.onnx_runtime import create_session

MODEL = "embedded:smollm2-135m-instruct"
EXITS, RATIOS, COMPRESS = [8, 16, 24, 30], [1, 2, 4], [8]
FORMAT = load_params(Path(__file__).resolve().parents[1] / "params.yaml").model.input_format  # the pipeline's


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def export(out: Path, attn: str = "eager", exits=EXITS, ratios=RATIOS) -> float:
    records = _Records()
    logger = logging.getLogger("matryoshka_reranker.pipeline.export")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    export_models(MODEL, out, exits, ratios, COMPRESS, options=ExportOptions(input_format=FORMAT,
                                                                            attn_implementation=attn))
    seconds = time.perf_counter() - start
    logger.removeHandler(records)
    print(f"## export ({attn} attention): {seconds:.0f} s in all")
    for message in records.messages:
        if "exported exits" in message or "parity" in message:
            print(f"  {message}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, help="an existing export of exits 8/16/24/30 x ratios 1/2/4")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="skip the exit-30 variants")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also time PyTorch in bf16 (default: where the CPU has AMX-BF16)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary exports (~6 GB)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    try:
        measure(args, work)
    finally:
        print(f"\n(load average at the end: {os.getloadavg()[0]:.1f}; exports in {work})" if args.keep else "")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> None:
    torch.set_num_threads(args.threads)
    onnx_dir = args.onnx or work / "onnx"
    if args.onnx is None:
        export(onnx_dir)

    pairs = scifact_pairs(args.pairs)
    torch_reranker = MatryoshkaReranker(MODEL, batch_size=args.batch_size, input_format=FORMAT,
                                        dtype="float32")  # as the exports
    half = MatryoshkaReranker(MODEL, batch_size=args.batch_size, input_format=FORMAT, dtype="bfloat16") \
        if (args.bf16 if args.bf16 is not None else cpu_has_amx_bf16()) else None
    tokens = statistics.mean(len(torch_reranker.encoder.encode(q, p).input_ids) for q, p in pairs)
    configs = [(k, r) for r in RATIOS for k in EXITS]
    ort = {c: OnnxReranker(onnx_dir / ratio_folder(c[1]), c[0], threads=args.threads) for c in configs}

    def run_ort(reranker):
        return lambda: reranker.compute_score(pairs, batch_size=args.batch_size)

    def run_torch(k, r, reranker=torch_reranker):
        return lambda: reranker.compute_score(pairs, cutoff_layers=[k], compress_layers=COMPRESS, compress_ratio=r)

    print(f"# {MODEL}: {len(pairs)} SciFact pairs, mean {tokens:.0f} tokens, batch {args.batch_size}, "
          f"{args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    diffs = {c: float(np.abs(np.array(ort[c].compute_score(pairs)) - run_torch(*c)()).max()) for c in configs}
    systems = {("ort", c): run_ort(ort[c]) for c in configs} | {("torch", c): run_torch(*c) for c in configs}
    if half is not None:
        systems |= {("bf16", c): run_torch(*c, reranker=half) for c in configs}
    seconds = interleaved_timing(systems, args.rounds)

    print("\n## ONNX Runtime vs PyTorch (eager mode, sdpa), same pairs, round-robin")
    print(f"{'config':18s} {'ORT pairs/s':>11s} {'torch pairs/s':>13s} {'ORT/torch':>9s} "
          f"{'ORT lat/exit30':>14s} {'torch lat/exit30':>16s} {'ideal k/30':>10s} {'max|diff|':>9s}"
          + (f" {'torch bf16 pairs/s':>18s} {'ORT/bf16':>8s}" if half is not None else ""))
    for k, r in configs:
        o, t = seconds[("ort", (k, r))], seconds[("torch", (k, r))]
        o30, t30 = seconds[("ort", (30, r))], seconds[("torch", (30, r))]
        print(f"{config_name(k, r):18s} {len(pairs) / o:11.2f} {len(pairs) / t:13.2f} {t / o:8.2f}x "
              f"{o / o30:14.3f} {t / t30:16.3f} {k / 30:10.3f} {diffs[(k, r)]:9.1e}"
              + (f" {len(pairs) / seconds[('bf16', (k, r))]:18.2f} {seconds[('bf16', (k, r))] / o:7.2f}x"
                 if half is not None else ""))
    for r in RATIOS[1:]:
        speed = [seconds[("ort", (k, 1))] / seconds[("ort", (k, r))] for k in EXITS[1:]]
        print(f"ratio {r} vs ratio 1, ORT speed-up at exits {EXITS[1:]}: " + ", ".join(f"{s:.2f}x" for s in speed))

    if args.quick:
        return
    print("\n## variants at exit 30, ratio 1 (round-robin among themselves)")
    full = onnx_dir / ratio_folder(1) / exit_model_file(30)
    reranker = ort[(30, 1)]
    variants = {}
    for threads in sorted({1, args.threads}):
        for level in ("basic", "all"):
            session = create_session(full, ["CPUExecutionProvider"], threads, optimization=level)
            variants[f"ORT eager export, opt {level}, {threads} thread(s)"] = _session_runner(session, reranker, pairs,
                                                                                            args.batch_size)
    variants[f"ORT eager export, no spin-wait, {args.threads} thread(s)"] = _session_runner(
        _no_spin_session(full, args.threads), reranker, pairs, args.batch_size)
    start = time.perf_counter()
    sdpa_dir = work / "sdpa"
    export(sdpa_dir, attn="sdpa", exits=[30], ratios=[1])
    variants["ORT sdpa export, opt all"] = run_ort(OnnxReranker(sdpa_dir / ratio_folder(1), 30, threads=args.threads))
    fused = _ort_fusions(full, work / "fused")
    if fused is not None:
        session = create_session(fused, ["CPUExecutionProvider"], args.threads)
        variants["ORT eager export + onnxscript ORT fusions"] = _session_runner(session, reranker, pairs,
                                                                                args.batch_size)
    print(f"(variant exports took {time.perf_counter() - start:.0f} s)")
    for threads in sorted({1, args.threads}):
        variants[f"torch, sdpa attention, {threads} thread(s)"] = _with_threads(run_torch(30, 1), threads)
    eager = MatryoshkaReranker(MODEL, batch_size=args.batch_size, input_format=FORMAT, dtype="float32")
    eager.model.decoder.config._attn_implementation = "eager"
    variants[f"torch, eager attention, {args.threads} thread(s)"] = run_torch(30, 1, eager)
    seconds = interleaved_timing(variants, args.rounds)
    base = seconds[f"torch, sdpa attention, {args.threads} thread(s)"]
    for name, s in seconds.items():
        print(f"{name:48s} {len(pairs) / s:7.2f} pairs/s {base / s:6.2f}x torch (sdpa, {args.threads} threads)")


def _with_threads(fn, threads: int):
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def _no_spin_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _session_runner(session, reranker: OnnxReranker, pairs, batch_size):
    """compute_score with another session on the same folder's tokenisation."""
    def run():
        original = reranker.session
        reranker.session = session
        try:
            return reranker.compute_score(pairs, batch_size=batch_size)
        finally:
            reranker.session = original
    return run


def _ort_fusions(model: Path, out: Path) -> Path | None:
    """onnxscript's ORT transformer fusions (RMSNorm, rotary, attention -> contrib ops), if they apply."""
    import onnx_ir as ir
    from onnxscript.rewriter import ort_fusions

    out.mkdir(parents=True)
    start = time.perf_counter()
    graph = ir.load(model)
    try:
        graph, counts = ort_fusions.optimize_for_ort(graph)
    except Exception as err:  # noqa: BLE001 - report and go on
        print(f"ORT fusions failed: {err}")
        return None
    ir.save(graph, out / "model.onnx", external_data="model.onnx.data")
    applied = {k: v for k, v in counts.items() if v}
    print(f"ORT fusions in {time.perf_counter() - start:.0f} s: {applied}")
    return out / "model.onnx"


if __name__ == "__main__":
    main()
