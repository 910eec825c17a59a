"""PyTorch forward speed: upstream-style eager attention vs our attention paths, with the GEMM peak.

    python -m benchmarks.bench_attention [--pairs 16] [--rounds 5] [--threads 2] [--compile] [--bf16]

Every system scores the same real SciFact pairs in one right-padded batch (as the issue's table:
16 pairs padded to the longest), at the same exits and compression, round-robin in one run:

* ``upstream-style eager``: eager attention with the full (B, 1, T, T) causal + padding float
  mask, which is what FlagEmbedding's CostWiseMistral builds (transformers 4.41, eager), and the deepest
  layer run for every token as upstream runs it (``common.whole_last_layer``; every other row runs it for
  the last token only, as the library does since 2026-12-07);
* ``sdpa + (B,1,T,T) mask``: our path before this change (transformers' SDPA given the float mask);
* ``eager, causal only``: eager attention with one (1, 1, T, T) causal bias (right padding needs no
  padding mask: ``modeling.attention_bias``);
* ``sdpa is_causal``: SDPA's fused causal kernel, no mask tensor at all;
* with ``--compile``, also ``sdpa is_causal + compile``: the same model under ``torch.compile``
  (inductor, C++ codegen on CPU; compiled once per config before timing, compile time printed);
* with ``--autotune``, also ``sdpa is_causal + autotune``: a copy of the model compiled with Inductor's
  ``freezing`` (weights folded in as constants, prepacked for oneDNN) and ``max_autotune`` with its
  C++ GEMM templates (each GEMM shape benchmarked against ATen's, epilogues fused into the winner);
* with ``--bf16`` (on by default where the CPU has AMX-BF16 tiles, i.e. where ``MatryoshkaReranker``'s
  "auto" dtype picks bf16), also ``sdpa is_causal, bf16``: the same weights loaded as that default does. Its scores
  are not fp32's to 1e-4, so it reports their Spearman correlation and largest difference instead.

Every system runs in this one process, whose allocator ``MatryoshkaReranker`` set up
(``core.hardware.keep_freed_memory``, unless ``MATRYOSHKA_CPU_MALLOC=0``): upstream-style eager gets
that help too here. ``benchmarks.bench_allocator`` times upstream-style eager in a process as glibc
comes, against our path with the allocator kept, side by side.

It prints pairs/s per system and config, each system's speed relative to upstream-style eager,
and the effective GFLOP/s at full depth against a same-run fp32 GEMM of the model's MLP shape
(real tokens x hidden x intermediate), timed in the same round-robin and taken as the median like the
rows, i.e. how close each path runs to this CPU's matmul peak (the bf16 path against a same-run bf16 GEMM
of that shape too). Before, the peak was a best-of-10 measured before and after the round-robin, against
median rows, which understated every "% of the peak"; that reading is printed alongside.
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import nullcontext

import torch
from scipy.stats import spearmanr

from benchmarks.common import interleaved_timing, machine_line, padded_batch, whole_last_layer
from matryoshka_reranker.core.hardware import cpu_has_amx_bf16, keep_freed_memory
from matryoshka_reranker.model import modeling
from matryoshka_reranker.serving.reranker import MatryoshkaReranker


def padded_mask_bias(mask: torch.Tensor, dtype: torch.dtype, implementation: str = "eager") -> torch.Tensor:
    """The (B, 1, T, T) causal + padding mask upstream (and our earlier code) built for every batch."""
    width = mask.shape[1]
    positions = torch.arange(width, device=mask.device)
    allowed = (positions[None, :] <= positions[:, None])[None] & mask[:, None, :].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def gemm_gflops(m: int, k: int, n: int, rounds: int = 10, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


PEAK_CALLS = 5  # back-to-back GEMMs per timed call of the peak's system


def peak_gemms(m: int, k: int, n: int, dtype: torch.dtype = torch.float32):
    """A call of ``PEAK_CALLS`` (m x k) @ (k x n) GEMMs, results dropped, to time in the round-robin beside the
    model: the peak then has the rows' statistic (a median), not a best-of-10 measured outside it."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)

    def call():
        for _ in range(PEAK_CALLS):
            a @ b
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the default path under torch.compile")
    parser.add_argument("--autotune", action="store_true",
                        help="also time torch.compile with freezing + max_autotune (C++ GEMM templates)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="also time a bf16 copy (default: where the CPU has AMX-BF16)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    torch.set_num_threads(args.threads)

    reranker, batch = padded_batch(args.model, args.pairs)
    model, size = reranker.model, batch["input_ids"].shape[0]
    real_tokens = int(batch["attention_mask"].sum())
    depth = model.num_layers
    configs = {"exit 30, ratio 1": (depth, 1), "exit 16, ratio 1": (16, 1), "exit 8, ratio 1": (8, 1),
               "exit 30, ratio 4 at layer 8": (depth, 4)}
    systems = {"upstream-style eager": ("eager", padded_mask_bias), "sdpa + (B,1,T,T) mask": ("sdpa", padded_mask_bias),
               "eager, causal only": ("eager", modeling.attention_bias), "sdpa is_causal": ("sdpa", modeling.attention_bias)}
    real_bias = modeling.attention_bias
    compiled = tuned = half = None
    if args.compile:
        systems["sdpa is_causal + compile"] = ("sdpa", modeling.attention_bias)
        compiled = torch.compile(model)
    if args.autotune:  # a copy: Dynamo caches per module instance, and freezing folds the weights in
        import copy

        systems["sdpa is_causal + autotune"] = ("sdpa", modeling.attention_bias)
        tuned = torch.compile(copy.deepcopy(model), options={"freezing": True, "max_autotune": True,
                                                             "max_autotune_gemm_backends": "CPP,ATEN"})
    if args.bf16 if args.bf16 is not None else cpu_has_amx_bf16():
        systems["sdpa is_causal, bf16"] = ("sdpa", modeling.attention_bias)
        half = MatryoshkaReranker(args.model, input_format=reranker.input_format, dtype="bfloat16").model  # as the
        # default loads it: RoPE's inv_freq stays fp32 (a plain .to(bf16) would round it) and the heads fp32

    def run(system: str, exit_layer: int, ratio: int):
        implementation, bias = systems[system]
        forward = (compiled if system.endswith("+ compile") else tuned if system.endswith("+ autotune")
                   else half if system.endswith("bf16") else model)

        def call():
            forward.config._attn_implementation = implementation
            modeling.attention_bias = bias
            try:
                with torch.inference_mode(), whole_last_layer() if system == "upstream-style eager" else nullcontext():
                    return forward(**batch, cutoff_layers=[exit_layer], compress_layers=[8] if ratio > 1 else [],
                                   compress_ratio=ratio)[0].float()
            finally:
                modeling.attention_bias = real_bias
        return call

    reference = {cfg: run("upstream-style eager", *values)() for cfg, values in configs.items()}
    for system in ("sdpa is_causal + compile", "sdpa is_causal + autotune"):  # compile every config before
        if system not in systems:  # timing (each is its own graph)
            continue
        for cfg, values in configs.items():
            started = time.perf_counter()
            run(system, *values)()
            print(f"# {system.split('+ ')[1]} {cfg}: {time.perf_counter() - started:.0f} s to compile")
    for system in systems:  # same scores (padding never reaches a real token)
        for cfg, values in configs.items():
            if system.endswith("bf16"):
                scores = run(system, *values)()
                rho = spearmanr(scores.numpy(), reference[cfg].numpy()).statistic
                print(f"# bf16 vs fp32 scores, {cfg}: Spearman {rho:.4f}, max |diff| "
                      f"{(scores - reference[cfg]).abs().max():.3f} (score range {reference[cfg].min():.2f}.."
                      f"{reference[cfg].max():.2f})")
            else:
                torch.testing.assert_close(run(system, *values)(), reference[cfg], atol=1e-4, rtol=1e-4)
    calls = {(s, c): run(s, *v) for s in systems for c, v in configs.items()}
    shape = (real_tokens, model.config.hidden_size, model.config.intermediate_size)
    peaks = {torch.float32: ("fp32 GEMM", "peak shape")}  # timed in the round-robin: median, as every row
    if half is not None:
        peaks[torch.bfloat16] = ("bf16 GEMM", "peak shape")
    for dtype, key in peaks.items():
        calls[key] = peak_gemms(*shape, dtype=dtype)
    gemm_before = gemm_gflops(*shape)
    seconds = interleaved_timing(calls, args.rounds)
    best = max(gemm_before, gemm_gflops(*shape))
    rate = {dtype: 2 * PEAK_CALLS * shape[0] * shape[1] * shape[2] / seconds.pop(key) / 1e9 for dtype, key in peaks.items()}
    gemm, gemm_bf16 = rate[torch.float32], rate.get(torch.bfloat16)

    linear = sum(p.numel() for n, p in model.decoder.layers.named_parameters() if p.dim() == 2)
    flops_full = 2 * linear * real_tokens  # matmuls of the 30 layers on real tokens (attention scores excluded)
    width = batch["input_ids"].shape[1]
    print(f"# {args.model}: {size} SciFact pairs, {real_tokens} real tokens padded to {width}, fp32"
          f"{' (and bf16 where named)' if half is not None else ''}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"# same-run fp32 GEMM {'x'.join(map(str, shape))}: {gemm:.0f} GFLOP/s (median in the round-robin, the rows' "
          f"statistic; best of 10 before/after: {best:.0f}); "
          f"allocator {'kept (keep_freed_memory)' if keep_freed_memory() else 'as glibc comes'} for every system")
    if gemm_bf16:
        print(f"# same-run bf16 GEMM of that shape: {gemm_bf16:.0f} GFLOP/s ({gemm_bf16 / gemm:.1f}x fp32)")
    header = f"{'config':28s}" + "".join(f"{s:>26s}" for s in systems)
    print(header + "   (pairs/s; x = vs upstream-style eager)")
    for cfg in configs:
        base = seconds[("upstream-style eager", cfg)]
        cells = [f"{size / seconds[(s, cfg)]:8.2f} ({base / seconds[(s, cfg)]:.2f}x)" for s in systems]
        print(f"{cfg:28s}" + "".join(f"{c:>26s}" for c in cells))
    full = "exit 30, ratio 1"
    print("effective GFLOP/s at full depth (linear layers, real tokens) and share of the GEMM peak:")
    for system in systems:
        rate = flops_full / seconds[(system, full)] / 1e9
        peak = gemm_bf16 if system.endswith("bf16") else gemm
        print(f"  {system:24s} {rate:6.1f} GFLOP/s  {100 * rate / peak:5.1f}% of its dtype's peak"
              + (f" ({100 * rate / gemm:.0f}% of the fp32 peak)" if peak is not gemm else ""))


if __name__ == "__main__":
    main()
