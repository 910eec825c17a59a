"""glibc's allocator as it comes vs ``keep_freed_memory`` (``core/hardware.py``), side by side in one run.

    python -m benchmarks.bench_allocator [--pairs 16] [--rounds 5] [--threads 2] [--compile] [--train | --train-only]

The allocator setting is per process, so two worker processes score the same batch as bench_attention
(``--pairs`` SciFact pairs right-padded to the longest, exits 30 / 16 / 8 and ratio 4 at layer 8):

* ``as it comes``: ``MATRYOSHKA_CPU_MALLOC=0``, i.e. what a PyTorch process gets without help. It runs
  upstream-style eager attention (the (B, 1, T, T) mask FlagEmbedding's CostWiseMistral builds, and the deepest
  layer for every token, as upstream runs: its process is as glibc comes) and our default path (SDPA is_causal) on that batch, and
  ``compute_score`` over ``--score-pairs`` other pairs (sorted batches of 16) in fp32 and, on AMX CPUs, bf16
  (the scoring default there);
* ``kept``: the library's default since this change: the same, less upstream-style eager, plus with
  ``--compile`` our path under ``torch.compile``.

The parent sends one call at a time: every (system, config) in a new seeded order each round, the two
processes' calls of it back to back (which goes first alternates), so both see the same machine load and
neither always runs after the same call; only one runs at any moment (2 threads each). How many pages a
call faults as glibc comes depends on what ran before it in that process (glibc raises its mmap
threshold after frees, and trims the heap top), hence the shuffled order. It prints pairs/s (forward rows against upstream-style eager, ``compute_score`` rows against the same
call as glibc comes; both where the kept process runs the same call), the page faults per call, and the effective
GFLOP/s at full depth against the same-run fp32 GEMM peak (the best of both processes, before and after:
the kept allocator's GEMM skips the output's page faults, so its peak is the higher one). ``--train``
also times one self-distillation step (``bench_train_step``'s, ratio 1 and 4) in each process.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import statistics
import time
from contextlib import nullcontext

CONFIGS = {"exit 30, ratio 1": (30, 1), "exit 16, ratio 1": (16, 1), "exit 8, ratio 1": (8, 1),
           "exit 30, ratio 4 at layer 8": (30, 4)}


def worker(keep: bool, args: argparse.Namespace, conn) -> None:
    """One process: builds the model under its allocator setting, then answers the parent's calls."""
    os.environ["MATRYOSHKA_CPU_MALLOC"] = "1" if keep else "0"
    import torch

    from benchmarks.bench_attention import gemm_gflops, padded_mask_bias
    from benchmarks.common import padded_batch, scifact_pairs, whole_last_layer
    from matryoshka_reranker.core.hardware import cpu_has_amx_bf16, keep_freed_memory
    from matryoshka_reranker.model import modeling
    from matryoshka_reranker.serving.reranker import MatryoshkaReranker

    torch.set_num_threads(args.threads)
    reranker, batch = padded_batch(args.model, args.pairs, batch_size=16)
    model, input_format = reranker.model, reranker.input_format
    if keep_freed_memory() is not keep:  # off glibc there is nothing to compare
        conn.send({"error": "keep_freed_memory() cannot be set in this process (glibc's malloc only)"})
        return
    shape = (int(batch["attention_mask"].sum()), model.config.hidden_size, model.config.intermediate_size)
    score_pairs = scifact_pairs(args.score_pairs, seed=1)
    models = {"forward, sdpa is_causal": model}
    biases = {"forward, sdpa is_causal": modeling.attention_bias}
    implementations = {"forward, sdpa is_causal": "sdpa"}
    rerankers = {"compute_score, fp32": reranker}
    if not keep:
        models["forward, upstream-style eager"] = model
        biases["forward, upstream-style eager"] = padded_mask_bias
        implementations["forward, upstream-style eager"] = "eager"
    elif args.compile:
        models["forward, sdpa + compile"] = torch.compile(model)
    if cpu_has_amx_bf16():  # the scoring default on AMX CPUs
        rerankers["compute_score, bf16"] = MatryoshkaReranker(args.model, input_format=input_format,
                                                             dtype="bfloat16", batch_size=16)
    real_bias = modeling.attention_bias
    if args.train_only:
        models, rerankers = {}, {}
    train = None
    if args.train or args.train_only:
        from benchmarks.bench_train_step import build, ours

        train = build(argparse.Namespace(model=args.model, start_layer=4, compress_layer=8, group_size=4, batch=1,
                                         train_method="distill_fix_layer_teacher"))

    def call(system: str, config: str) -> float:
        start = time.perf_counter()
        if system.startswith("train step"):
            peft_model, train_batch, _, layer = train
            ratio = int(system.split("ratio ")[1])
            peft_model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            ours(peft_model, train_batch, [layer] if ratio > 1 else [], ratio)
            return time.perf_counter() - start
        exit_layer, ratio = CONFIGS[config]
        compress = [8] if ratio > 1 else []
        if system in rerankers:
            rerankers[system].compute_score(score_pairs, cutoff_layers=[exit_layer], compress_layers=compress,
                                            compress_ratio=ratio)
            return time.perf_counter() - start
        forward = models[system]
        forward.config._attn_implementation = implementations.get(system, "sdpa")
        modeling.attention_bias = biases.get(system, real_bias)
        try:
            with torch.inference_mode(), whole_last_layer() if "upstream" in system else nullcontext():
                start = time.perf_counter()
                forward(**batch, cutoff_layers=[exit_layer], compress_layers=compress, compress_ratio=ratio)
                return time.perf_counter() - start
        finally:
            modeling.attention_bias = real_bias

    systems = list(models) + list(rerankers) + (["train step, ratio 1", "train step, ratio 4"] if train else [])
    linear = sum(p.numel() for p in model.decoder.layers.parameters() if p.dim() == 2)  # as bench_attention counts
    conn.send({"systems": systems, "shape": shape, "flops": 2 * linear * shape[0]})
    while (message := conn.recv()) is not None:
        kind, *rest = message
        if kind == "gemm":
            conn.send(gemm_gflops(*shape))
        else:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = call(*rest)
            conn.send((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--score-pairs", type=int, default=64, help="pairs per compute_score call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the kept process's model under torch.compile")
    parser.add_argument("--train", action="store_true", help="also time a self-distillation step in each process")
    parser.add_argument("--train-only", action="store_true", help="time the self-distillation step only")
    args = parser.parse_args()
    from benchmarks.common import machine_line

    print(machine_line(), flush=True)
    context = multiprocessing.get_context("spawn")
    workers = {}
    for keep, label in ((False, "as it comes"), (True, "kept")):
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(keep, args, child), daemon=True)
        process.start()
        child.close()  # so that a worker's death ends the parent's recv with EOFError instead of a hang
        workers[label] = (process, parent, parent.recv())
        if "error" in workers[label][2]:
            raise SystemExit(workers[label][2]["error"])
    calls = [(label, system, config) for label, (_, _, info) in workers.items() for system in info["systems"]
             for config in (["-"] if system.startswith("train") else CONFIGS)]
    for label, system, config in calls:  # warm-up (and compile) before any timing
        workers[label][1].send(("call", system, config))
        workers[label][1].recv()

    def peak() -> float:
        rates = []
        for _, conn, _ in workers.values():
            conn.send(("gemm",))
            rates.append(conn.recv())
        return max(rates)

    gemm = peak()
    times, faults = {c: [] for c in calls}, {c: [] for c in calls}
    groups: dict[tuple, list] = {}  # (system, config) -> its calls in both processes, run back to back
    for key in calls:
        groups.setdefault(key[1:], []).append(key)
    order, rng = list(groups), random.Random(0)
    for round_ in range(args.rounds):
        rng.shuffle(order)  # a new order every round: no call always follows the same one
        for index, task in enumerate(order):
            pair = groups[task] if (round_ + index) % 2 else groups[task][::-1]  # which process goes first alternates
            for key in pair:
                workers[key[0]][1].send(("call", key[1], key[2]))
                seconds, count = workers[key[0]][1].recv()
                times[key].append(seconds)
                faults[key].append(count)
    gemm = max(gemm, peak())
    for _, conn, _ in workers.values():
        conn.send(None)
    shape = next(iter(workers.values()))[2]["shape"]
    median = {key: statistics.median(values) for key, values in times.items()}

    print(f"# {args.pairs} SciFact pairs ({shape[0]} real tokens), {args.threads} threads per process, "
          f"{args.rounds} rounds; same-run fp32 GEMM {'x'.join(map(str, shape))}: {gemm:.0f} GFLOP/s")
    print(f"{'allocator':12s} {'system':30s} {'config':28s} {'pairs/s':>8s} {'vs upstream':>12s} "
          f"{'kept / as it comes':>19s} {'faults/call':>12s}")
    for label, system, config in calls:
        if system.startswith("train"):
            continue
        seconds, count = median[(label, system, config)], args.score_pairs if "compute_score" in system else args.pairs
        upstream = (f"{median[('as it comes', 'forward, upstream-style eager', config)] / seconds:11.2f}x"
                    if system.startswith("forward") else f"{'':12s}")
        other = ("as it comes", system, config)
        allocator = (f"{median[other] / seconds:18.2f}x" if label == "kept" and other in median else f"{'':19s}")
        print(f"{label:12s} {system:30s} {config:28s} {count / seconds:8.2f} {upstream} {allocator} "
              f"{statistics.median(faults[(label, system, config)]):12.0f}")
    flops = next(iter(workers.values()))[2]["flops"]  # linear layers of all layers on real tokens
    print("effective GFLOP/s at full depth (linear layers, real tokens), share of the same-run fp32 GEMM peak:")
    for label, system, config_name in calls:
        if config_name == "exit 30, ratio 1" and system.startswith("forward"):
            rate = flops / median[(label, system, config_name)] / 1e9
            print(f"  {label:12s} {system:30s} {rate:7.1f} GFLOP/s  {100 * rate / gemm:5.1f}%")
    for system in ("train step, ratio 1", "train step, ratio 4"):
        keys = [("as it comes", system, "-"), ("kept", system, "-")]
        if keys[0] in median:
            print(f"{system} (forward + backward, no optimizer step): as it comes {median[keys[0]]:.3f} s, kept {median[keys[1]]:.3f} s "
                  f"({median[keys[0]] / median[keys[1]]:.2f}x), faults {statistics.median(faults[keys[0]]):.0f} vs "
                  f"{statistics.median(faults[keys[1]]):.0f} per step")


if __name__ == "__main__":
    main()
