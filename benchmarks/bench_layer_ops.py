"""Where one decoder layer's CPU time goes, and the ceiling the GEMMs alone put on "% of GEMM peak".

    python -m benchmarks.bench_layer_ops [--batch 16] [--length 214] [--real-tokens 3140] [--threads 2]

Times, round-robin in one run (``benchmarks.common.interleaved_timing``) and on the same input (fp32, the embedded SmolLM2-135M's layer 10, a batch of
``--batch`` rows of ``--length`` tokens: bench_attention's 16 SciFact pairs padded to 214), the whole
layer (SDPA is_causal, our default path) and each GEMM at the layer's own shapes (q/k/v, o, gate/up,
down, fused q|k|v and gate|up as an inference engine would stack them), the elementwise parts
(SiLU x up, RMSNorm) and a torch.profiler breakdown by op. From these it prints:

* each GEMM's GFLOP/s against the same-run GEMM of bench_attention's peak shape
  (real tokens x hidden x intermediate);
* the **GEMM-only ceiling**: the layer's linear FLOPs over the summed GEMM time, counted on real
  tokens (as bench_attention counts them) and on all padded rows. A path that spent no time at all
  outside the GEMMs would reach this share of the peak and no more; it is what bounds issue 13's
  "80% of the same-run GEMM peak at full depth".
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers import AutoModel

from benchmarks.common import interleaved_timing, machine_line
from matryoshka_reranker.core.assets import resolve_model_path
from matryoshka_reranker.core.hardware import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=214)
    parser.add_argument("--real-tokens", type=int, default=3140, help="real (unpadded) tokens in the batch")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as the library's models run (MATRYOSHKA_CPU_MALLOC=0: glibc as it comes)
    print(machine_line())

    model = AutoModel.from_pretrained(resolve_model_path(args.model), dtype=torch.float32,
                                      attn_implementation="sdpa").eval()
    layer, config = model.layers[args.layer], model.config
    hidden, inter = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * (hidden // config.num_attention_heads)
    kv_out = config.num_key_value_heads * (hidden // config.num_attention_heads)
    rows = args.batch * args.length
    x = torch.randn(args.batch, args.length, hidden)                     # (B, T, D)
    positions = torch.arange(args.length)[None]
    cos_sin = model.rotary_emb(x, positions)
    flat, wide = x.reshape(rows, hidden), torch.randn(rows, inter)       # (B*T, D), (B*T, I)
    attn, mlp = layer.self_attn, layer.mlp
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous()
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
    peak_a, peak_b = torch.randn(args.real_tokens, hidden), torch.randn(hidden, inter)

    gemms = {  # name: (fn, flops)
        "q, k, v (3 GEMMs)": (lambda: (F.linear(flat, attn.q_proj.weight), F.linear(flat, attn.k_proj.weight),
                                       F.linear(flat, attn.v_proj.weight)), 2 * rows * hidden * (q_out + 2 * kv_out)),
        "q|k|v fused": (lambda: F.linear(flat, qkv), 2 * rows * hidden * (q_out + 2 * kv_out)),
        "o": (lambda: F.linear(flat, attn.o_proj.weight), 2 * rows * q_out * hidden),
        "gate, up (2 GEMMs)": (lambda: (F.linear(flat, mlp.gate_proj.weight), F.linear(flat, mlp.up_proj.weight)),
                               2 * rows * hidden * 2 * inter),
        "gate|up fused": (lambda: F.linear(flat, gate_up), 2 * rows * hidden * 2 * inter),
        "down": (lambda: F.linear(wide, mlp.down_proj.weight), 2 * rows * inter * hidden),
    }
    others = {"silu(gate) * up": lambda: F.silu(wide) * wide, "RMSNorm": lambda: layer.input_layernorm(x)}
    systems = {"peak": lambda: peak_a @ peak_b,
               "whole layer": lambda: layer(x, attention_mask=None, position_embeddings=cos_sin, position_ids=positions),
               **{name: fn for name, (fn, _) in gemms.items()}, **others}
    with torch.inference_mode():
        seconds = interleaved_timing(systems, args.repeats)  # median per call, round-robin
        peak, whole = 2 * args.real_tokens * hidden * inter / seconds["peak"], seconds["whole layer"]
        gemm_times = {name: seconds[name] for name in gemms}
        other = {name: seconds[name] for name in others}
        with torch.profiler.profile() as profile:
            for _ in range(3):
                layer(x, attention_mask=None, position_embeddings=cos_sin, position_ids=positions)

    print(f"# layer {args.layer}, {args.batch} x {args.length} rows ({args.real_tokens} real tokens), fp32, "
          f"{args.threads} threads; same-run GEMM {args.real_tokens}x{hidden}x{inter}: {peak / 1e9:.0f} GFLOP/s; "
          f"allocator {'kept' if kept else 'as glibc comes'}")
    print(f"{'part':<22} {'ms':>8} {'GFLOP/s':>9} {'of peak':>8}")
    for name, (_, flops) in gemms.items():
        rate = flops / gemm_times[name]
        print(f"{name:<22} {gemm_times[name] * 1e3:8.2f} {rate / 1e9:9.1f} {rate / peak:8.1%}")
    for name, seconds in other.items():
        print(f"{name:<22} {seconds * 1e3:8.2f}")
    linear = 2 * rows * (hidden * (q_out + 2 * kv_out) + q_out * hidden + 3 * hidden * inter)
    gemm_sum = gemm_times["q, k, v (3 GEMMs)"] + gemm_times["o"] + gemm_times["gate, up (2 GEMMs)"] + gemm_times["down"]
    real = args.real_tokens / rows
    print(f"{'whole layer':<22} {whole * 1e3:8.2f} {linear * real / whole / 1e9:9.1f} {linear * real / whole / peak:8.1%}"
          "   (real tokens, as bench_attention counts)")
    print(f"GEMMs alone: {gemm_sum * 1e3:.1f} ms = {gemm_sum / whole:.0%} of the layer; GEMM-only ceiling "
          f"{linear * real / gemm_sum / peak:.1%} of peak on real tokens, {linear / gemm_sum / peak:.1%} on all rows")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
