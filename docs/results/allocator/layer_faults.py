"""One fp32 decoder layer of the embedded SmolLM2-135M (layer 10, 16 x 214 random rows), timed alternately with
a GEMM of the MLP shape, with the page faults per layer call; run once per allocator setting:

    MATRYOSHKA_CPU_MALLOC=0 python docs/results/allocator/layer_faults.py   # glibc as it comes
    MATRYOSHKA_CPU_MALLOC=1 python docs/results/allocator/layer_faults.py   # keep_freed_memory (the default)
"""

import resource
import time

import torch
from transformers import AutoModel

from matryoshka_reranker.core.assets import resolve_model_path
from matryoshka_reranker.core.hardware import keep_freed_memory

torch.set_num_threads(2)
kept = keep_freed_memory()
model = AutoModel.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"), dtype=torch.float32,
                                  attn_implementation="sdpa").eval()
layer, config = model.layers[10], model.config
x, positions = torch.randn(16, 214, 576), torch.arange(214)[None]
cos_sin = model.rotary_emb(x, positions)
a, b = torch.randn(3140, 576), torch.randn(576, 1536)
with torch.inference_mode():
    for _ in range(3):
        layer(x, attention_mask=None, position_embeddings=cos_sin, position_ids=positions)
        a @ b
    faults, layer_s, gemm_s = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, [], []
    for _ in range(15):
        start = time.perf_counter()
        layer(x, attention_mask=None, position_embeddings=cos_sin, position_ids=positions)
        layer_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        a @ b
        gemm_s.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 15
peak = 2 * 3140 * 576 * 1536 / sorted(gemm_s)[7]
linear = 2 * 3140 * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536)  # on 3,140 real tokens, as bench_layer_ops
print(f"allocator {'kept' if kept else 'as glibc comes'}: layer {sorted(layer_s)[7] * 1e3:.1f} ms (median of 15), "
      f"GEMM peak {peak / 1e9:.0f} GFLOP/s, layer at {linear / sorted(layer_s)[7] / peak:.1%} of it, "
      f"{faults:.0f} page faults per layer call and GEMM")
