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
* ``hand-fused, packed``: the best eager path written here for the measurement, not shipped: real tokens
  only (packed rows, attention padded per layer and unpacked again), RMSNorm in three passes, RoPE in three
  elementwise ops, q|k|v and gate|up as one GEMM each, SiLU x up in place, the
  residual adds inside ``addmm``. Its scores match the default's to 1e-4;
* with ``--compile``: the default model and the hand-fused layer under ``torch.compile`` (Inductor fuses
  the elementwise work into C++ loops).

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

PEAK, PEAK_CALLS = "fp32 GEMM, peak shape", 5  # the peak's system: 5 back-to-back GEMMs per timed call


class FusedLayerWeights:
    """One decoder layer's weights as the hand-fused path reads them (q|k|v and gate|up stacked)."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous()
        self.gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
        self.o, self.down = attn.o_proj.weight, mlp.down_proj.weight
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.scaling, self.head_dim = attn.scaling, attn.head_dim
        self.heads, self.kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(N, D): three passes over x (norm, scale, weight) where transformers' RMSNorm makes four (pow, mean, two muls)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (N, 1)
    return torch.mul(x, norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()).mul_(weight)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """(N, heads, hd): x * cos + rotate_half(x) * sin as a flip, a multiply and a fused multiply-add (transformers:
    neg, cat, two multiplies and an add)."""
    half = x.shape[-1] // 2
    flipped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # [x2, x1]; sin_signed = [-sin, sin]
    return torch.addcmul(x * cos, flipped, sin_signed)


def fused_layer(x, cos, sin_signed, rows, qkv, o, gate_up, down, norm1, norm2, eps1, eps2, scaling, dims):
    """x (N, D) packed real tokens -> (N, D); ``rows`` (N,) their flat index in the padded (B*T) grid.
    Weights come as arguments, so that one compiled graph serves every layer."""
    batch, width, heads, kv, hd = dims  # right padded: row b's real tokens are its first lengths[b]
    q, k, v = (rms_norm(x, norm1, eps1) @ qkv.T).split([heads * hd, kv * hd, kv * hd], -1)
    q = rope(q.view(-1, heads, hd), cos, sin_signed)
    k = rope(k.view(-1, kv, hd), cos, sin_signed)

    def padded(t):  # (N, h, hd) -> (B, h, T, hd)
        out = t.new_zeros(batch * width, t.shape[1], hd)
        out[rows] = t
        return out.view(batch, width, -1, hd).transpose(1, 2)

    attn = F.scaled_dot_product_attention(padded(q), padded(k), padded(v.view(-1, kv, hd)), is_causal=True,
                                          enable_gqa=True, scale=scaling)  # (B, H, T, hd)
    x = torch.addmm(x, attn.transpose(1, 2).reshape(batch * width, -1)[rows], o.T)
    gate, up = (rms_norm(x, norm2, eps2) @ gate_up.T).chunk(2, -1)
    return torch.addmm(x, F.silu(gate).mul_(up), down.T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the default and hand-fused paths compiled")
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
    weights = [FusedLayerWeights(layer) for layer in model.decoder.layers]
    hd, heads, kv = weights[0].head_dim, weights[0].heads, weights[0].kv_heads
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

    def hand_fused(layer_fn=fused_layer):
        def call():
            with torch.inference_mode():
                x = model.decoder.embed_tokens(batch["input_ids"])  # (B, T, D)
                cos, sin = model.decoder.rotary_emb(x, torch.arange(width)[None])  # (1, T, hd)
                sin_signed = torch.cat([-sin[0, :, : hd // 2], sin[0, :, hd // 2:]], -1)
                cos_rows = cos[0].repeat(size, 1)[rows][:, None]  # (N, 1, hd)
                sin_rows = sin_signed.repeat(size, 1)[rows][:, None]
                x = x.reshape(-1, hidden)[rows]  # (N, D)
                dims = (size, width, heads, kv, hd)
                for w in weights:
                    x = layer_fn(x, cos_rows, sin_rows, rows, w.qkv, w.o, w.gate_up, w.down, w.norm1, w.norm2,
                                 w.eps1, w.eps2, w.scaling, dims)
                last = x[lengths.cumsum(0) - 1]  # (B, D) each row's last real token
                head = model.score_heads[str(depth)]
                return head(model.decoder.norm(last)).squeeze(-1)
        return call

    calls = {"GEMMs only": gemms_and(), "GEMMs + SDPA": gemms_and(sdpa_padded),
             "GEMMs + SDPA per row": gemms_and(sdpa_per_row), "default": default(), "hand-fused, packed": hand_fused()}
    reference = calls["default"]()
    torch.testing.assert_close(calls["hand-fused, packed"](), reference, atol=1e-4, rtol=1e-4)
    if args.compile:
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # no silent fall back to eager after recompiles
        for name, call in (("default + compile", default(torch.compile(model))),
                           ("hand-fused, packed + compile",
                            hand_fused(torch.compile(fused_layer, dynamic=False, fullgraph=True)))):
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
    gemm = seconds["GEMMs only"]
    attention = min(seconds["GEMMs + SDPA"], seconds["GEMMs + SDPA per row"]) - gemm
    budget = flops / (0.8 * peak * 1e9)  # seconds a full-depth call may take at 80% of the peak
    print(f"80% of the peak allows {budget:.3f} s per call: the GEMMs take {gemm:.3f} s ({100 * gemm / budget:.0f}% of it), "
          f"PyTorch's attention (faster layout) {attention:.3f} s more ({100 * attention / budget:.0f}%), leaving "
          f"{budget - gemm - attention:+.3f} s for every norm, RoPE, SiLU, residual add, embedding and head")


if __name__ == "__main__":
    main()
