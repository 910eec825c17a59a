"""How close to the fp32 GEMM peak can a full-depth forward get on this CPU? Ceilings and the best path built.

    python -m benchmarks.bench_ceiling [--pairs 16] [--rounds 5] [--threads 2] [--compile]

Issue 13 asks for >= 80% of the same-run fp32 GEMM peak at full depth. ``bench_layer_ops`` bounds one
layer by its GEMMs alone; this script bounds the whole model, in one run, round-robin
(``benchmarks.common.interleaved_timing``), on bench_attention's batch (16 SciFact pairs, right padded):

* ``GEMMs only``: the 30 layers' seven projections (q, k, v, o, gate, up, down) with the model's own
  weights, on the batch's real tokens only (a packed batch: no padding row at all), nothing else: the
  bound of any path that runs these seven GEMMs per layer as separate ATen calls (stacking q|k|v and
  gate|up, or Inductor's own GEMM templates, are other calls: ``bench_layer_ops``, ``bench_attention
  --autotune``). The inputs are the same two tensors every call, a little kinder to the caches than a
  real chain of ops;
* ``GEMMs + SDPA``: the same, plus each layer's attention as PyTorch's fused CPU kernel runs it
  (``scaled_dot_product_attention``, ``is_causal``, GQA) on the padded (B, H, T, hd) batch; ``GEMMs +
  SDPA per row`` runs it one sequence at a time on its real length instead (no padding in attention
  either: less work than the padded call). The faster of the two bounds such a path once it also runs
  PyTorch's attention kernel, with every RMSNorm, RoPE, SiLU and residual add free;
* ``default``: ``MatryoshkaModel`` as it scores (transformers' layers, SDPA ``is_causal``);
* ``packed``: the library's padding-free forward (``model/packed.py``, ``MatryoshkaReranker(packed=True)``,
  shipped since 2026-12-07; written here first for this measurement as the "hand-fused" path): real tokens
  only (packed rows, attention padded per layer and unpacked again), RMSNorm in three passes, RoPE in three
  elementwise ops, q|k|v and gate|up as one GEMM each, the residual adds inside ``addmm``. Its scores
  match the default's to 1e-4 (checked here before timing);
* with ``--compile``: the default model and the packed forward as they compile in the library
  (``torch.compile``, dynamic shapes: one graph for every batch; Inductor fuses the elementwise work);
* ``..., whole last layer``: the same path with its deepest layer run for every token, as before 2026-12-07
  (since then the deepest layer runs for each row's last token only: ``modeling.last_token_layer``;
  ``bench_last_token`` times that alone at every exit).

Linear-layer FLOPs are counted on real tokens (as bench_attention counts them); the GEMM peak is the
same-run fp32 GEMM of the model's MLP shape (real tokens x hidden x intermediate), timed in the same
round-robin and taken as the median like every row (a best-of-10 peak measured before and after, against
median rows, understated every "% of the peak", the GEMMs-only ceiling included; it is printed alongside).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo
import torch.nn.functional as F

from benchmarks.bench_attention import gemm_gflops
from benchmarks.common import interleaved_timing, machine_line, padded_batch
from matryoshka_reranker.model.packed import PackedForward

PEAK, PEAK_CALLS = "fp32 GEMM, peak shape", 5  # the peak's system: 5 back-to-back GEMMs per timed call


def compiled_packed(model) -> PackedForward:
    forward = PackedForward(model, compile=True)
    if not forward.compiled:
        raise SystemExit("torch.compile failed for the packed forward (see the warning): nothing to time compiled")
    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the default and packed paths compiled")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    torch.set_num_threads(args.threads)

    reranker, batch = padded_batch(args.model, args.pairs)
    model = reranker.model
    mask = batch["attention_mask"]
    size, width = mask.shape
    lengths = mask.sum(1)
    rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,) real tokens in the flat padded grid
    real_tokens = rows.numel()
    config, depth = model.config, model.num_layers
    hidden, inter = config.hidden_size, config.intermediate_size
    hd, heads, kv = model.decoder.layers[0].self_attn.head_dim, config.num_attention_heads, config.num_key_value_heads
    projections = [[getattr(layer.self_attn, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
                   + [getattr(layer.mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")]
                   for layer in model.decoder.layers]

    x_in, wide_in = torch.randn(real_tokens, hidden), torch.randn(real_tokens, inter)
    q_in, kv_in = torch.randn(size, heads, width, hd), torch.randn(size, kv, width, hd)
    per_row = [(torch.randn(1, heads, n, hd), torch.randn(1, kv, n, hd)) for n in lengths.tolist()]

    def gemms_and(attention_call=None):
        def call():
            with torch.inference_mode():
                for layer in projections:
                    for w in layer:
                        (wide_in if w.shape[1] == inter else x_in) @ w.T  # result dropped: time only
                    if attention_call is not None:
                        attention_call()
        return call

    def sdpa_padded():
        F.scaled_dot_product_attention(q_in, kv_in, kv_in, is_causal=True, enable_gqa=True)

    def sdpa_per_row():
        for q, k in per_row:
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)

    def default(forward=model):
        def call():
            with torch.inference_mode():
                return forward(**batch, cutoff_layers=[depth])[0]
        return call

    def packed_call(forward):  # the library's padding-free forward (model/packed.py), as MatryoshkaReranker(packed=True)
        def call():
            with torch.inference_mode():
                return forward(batch["input_ids"], batch["attention_mask"], [depth])[0]
        return call

    def whole_last_layer(call, forward):  # the same path with the deepest layer run for every token, as before 2026-12-07
        def whole():
            forward.last_token_only = False
            try:
                return call()
            finally:
                forward.last_token_only = True
        return whole

    def default_whole():  # the default forward with the deepest layer run for every token
        with torch.inference_mode():
            state = model.embed(batch["input_ids"], batch["attention_mask"], batch["query_lengths"],
                                batch["prompt_lengths"])
            return model.advance(state, depth, {depth})[1][depth]

    packed = PackedForward(model)
    calls = {"GEMMs only": gemms_and(), "GEMMs + SDPA": gemms_and(sdpa_padded),
             "GEMMs + SDPA per row": gemms_and(sdpa_per_row), "default": default(), "default, whole last layer": default_whole,
             "packed": packed_call(packed),
             "packed, whole last layer": whole_last_layer(packed_call(packed), packed)}
    reference = calls["default"]()
    torch.testing.assert_close(calls["packed"](), reference, atol=1e-4, rtol=1e-4)
    if args.compile:
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # no silent fall back to eager after recompiles
        compiled = compiled_packed(model)
        for name, make in (("default + compile", lambda: default(torch.compile(model))),
                           ("packed + compile", lambda: packed_call(compiled)),
                           ("packed + compile, whole last layer", lambda: whole_last_layer(packed_call(compiled), compiled))):
            started = time.perf_counter()
            call = make()
            started = time.perf_counter()
            torch.testing.assert_close(call(), reference, atol=1e-4, rtol=1e-4)
            print(f"# {name}: {time.perf_counter() - started:.0f} s to compile")
            calls[name] = call

    shape = (real_tokens, hidden, inter)
    peak_a, peak_b = torch.randn(real_tokens, hidden), torch.randn(hidden, inter)

    def peak_gemms():  # timed in the round-robin, as the rows; results dropped as in ``gemms_and``
        for _ in range(PEAK_CALLS):
            peak_a @ peak_b

    calls[PEAK] = peak_gemms
    gemm_before = gemm_gflops(*shape)
    seconds = interleaved_timing(calls, args.rounds)
    best = max(gemm_before, gemm_gflops(*shape))
    peak = 2 * real_tokens * hidden * inter * PEAK_CALLS / seconds.pop(PEAK) / 1e9  # median, as every row's time
    flops = 2 * sum(w.numel() for layer in projections for w in layer) * real_tokens
    attention_flops = 2 * 2 * heads * hd * sum(n * (n + 1) // 2 for n in lengths.tolist()) * depth  # causal QK^T, PV
    print(f"# {args.model}: {size} SciFact pairs, {real_tokens} real tokens padded to {width} ({size * width} rows), fp32, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds; same-run fp32 GEMM {'x'.join(map(str, shape))}: "
          f"{peak:.0f} GFLOP/s (median in the round-robin, the rows' statistic; best of 10 before/after: {best:.0f})")
    print(f"{'system':30s} {'s/call':>8s} {'pairs/s':>8s} {'GFLOP/s':>8s} {'of peak':>8s} {'vs default':>10s}")
    for name, value in seconds.items():
        rate = flops / value / 1e9
        print(f"{name:30s} {value:8.3f} {size / value:8.2f} {rate:8.1f} {100 * rate / peak:7.1f}% "
              f"{seconds['default'] / value:9.2f}x")
    print(f"# linear layers {flops / 1e9:.1f} GFLOP per call, causal attention {attention_flops / 1e9:.1f} GFLOP")
    last = projections[-1]  # the paths that run the deepest layer for each row's last token only skip q, o and the MLP
    skipped = 2 * (real_tokens - size) * sum(w.numel() for i, w in enumerate(last) if i not in (1, 2))  # all but k, v
    print(f"# 'GFLOP/s' and 'of peak' count every real token's linear work at every layer (the issue's effective "
          f"throughput); default and packed (not the 'whole last layer' rows) skip {skipped / 1e9:.1f} GFLOP of it "
          f"({100 * skipped / flops:.1f}%): on the work they do, their '% of peak' is {1 - skipped / flops:.3f}x the figure")
    gemm = seconds["GEMMs only"]
    attention = min(seconds["GEMMs + SDPA"], seconds["GEMMs + SDPA per row"]) - gemm
    budget = flops / (0.8 * peak * 1e9)  # seconds a full-depth call may take at 80% of the peak
    print(f"80% of the peak allows {budget:.3f} s per call: the GEMMs take {gemm:.3f} s ({100 * gemm / budget:.0f}% of it), "
          f"PyTorch's attention (faster layout) {attention:.3f} s more ({100 * attention / budget:.0f}%), leaving "
          f"{budget - gemm - attention:+.3f} s for every norm, RoPE, SiLU, residual add, embedding and head")


if __name__ == "__main__":
    main()
