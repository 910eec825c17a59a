"""A padding-free forward for uncompressed scoring (ratio 1): the same scores, less work around the GEMMs.

Why: on CPU the default forward (transformers' decoder layers over the right-padded batch) spends a
third of its time outside the linear layers: padding rows, RMSNorm in four passes, RoPE in five ops,
separate q / k / v and gate / up GEMMs, residual adds. This forward runs the linear layers on the
real tokens only (packed, (N, D)), q|k|v and gate|up as one GEMM each, RMSNorm in three passes, RoPE
as a flip and a fused multiply-add, the residual adds inside ``addmm``; attention still runs over the
padded grid (PyTorch's SDPA, ``is_causal``, GQA), one scatter and one gather per layer. Measured
side by side with the default in ``benchmarks/bench_ceiling`` (README "Speed", "The 80% ceiling").

Scope: inference at ratio 1 (the token merge needs the padded layout), float32, Llama-family layers
(q/k/v/o projections, q/k/v biases allowed, SiLU gate/up/down MLP, RMSNorm). ``packed_problem`` says
why a model is not supported; ``MatryoshkaReranker(packed=True)`` then stays on the default forward.
The stacked weights are copies taken when ``PackedForward`` is built (about 60% of the decoder's
weights again): build it after the model is final (adapters merged, device chosen).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch._dynamo
import torch.nn.functional as F

log = logging.getLogger(__name__)

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def packed_problem(model) -> str | None:
    """Why ``model`` cannot take the packed forward, or None."""
    from .modeling import trim_problem

    if next(model.parameters()).dtype != torch.float32:
        return "the packed forward is float32 only"
    for layer in model.decoder.layers:  # the same layer forward the last-token layer reproduces, less q/k norms
        problem = trim_problem(layer)
        if problem:
            return f"the packed forward needs Llama-style layers: {problem}"
        if getattr(layer.self_attn, "q_norm", None) is not None:
            return "the packed forward does not apply per-head q/k norms (Qwen3)"
    if getattr(model.config, "hidden_act", "silu") != "silu":
        return f"the packed forward needs a SiLU MLP, not {model.config.hidden_act}"
    for layer in model.decoder.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in _PROJECTIONS) \
                or not all(hasattr(mlp, n) for n in _MLP):
            return "the packed forward needs Llama-family layers (q/k/v/o and gate/up/down projections)"
        if attn.o_proj.bias is not None or any(getattr(mlp, n).bias is not None for n in _MLP):
            return "the packed forward supports biases on q/k/v only"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or getattr(norm, "bias", None) is not None:
                return "the packed forward needs RMSNorm layers"
    return None


class _Layer:
    """One decoder layer's weights as the packed forward reads them (q|k|v and gate|up stacked)."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv = torch.cat([p.weight for p in projections]).detach().contiguous()  # (Hq+2Hkv)*hd x D
        biases = [p.bias for p in projections]
        self.qkv_bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else p.weight.new_zeros(p.weight.shape[0]) for b, p in zip(biases, projections)]).detach()
        self.gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().contiguous()  # 2I x D
        self.o, self.down = attn.o_proj.weight.detach(), mlp.down_proj.weight.detach()
        self.norm1, self.eps1 = layer.input_layernorm.weight.detach(), layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = (layer.post_attention_layernorm.weight.detach(),
                                 layer.post_attention_layernorm.variance_epsilon)
        self.scaling = attn.scaling


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(N, D): three passes over x (norm, scale, weight) where transformers' RMSNorm makes four."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (N, 1)
    return torch.mul(x, norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()).mul_(weight)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """(N, heads, hd): x * cos + rotate_half(x) * sin as a flip, a multiply and a fused multiply-add."""
    half = x.shape[-1] // 2
    flipped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # [x2, x1]; sin_signed = [-sin, sin]
    return torch.addcmul(x * cos, flipped, sin_signed)


def packed_layer(x, cos, sin_signed, rows, grid, qkv, qkv_bias, o, gate_up, down, norm1, norm2, eps1, eps2, scaling,
                 heads: int, kv: int, hd: int):
    """x (N, D) packed real tokens -> (N, D); ``rows`` (N,) their flat index in the padded (B*T) grid, whose
    shape ``grid`` (the (B, T) attention mask) gives: a tensor's size, not a Python int, so a compiled graph
    stays generic in B and T (ints would be specialised, one compile per batch shape). Weights come as
    arguments, so one compiled graph serves every layer."""
    batch, width = grid.shape  # right padded: row b's real tokens are its first lengths[b]
    normed = rms_norm(x, norm1, eps1)
    q, k, v = (normed @ qkv.T if qkv_bias is None else torch.addmm(qkv_bias, normed, qkv.T)).split(
        [heads * hd, kv * hd, kv * hd], -1)
    q = rope(q.view(-1, heads, hd), cos, sin_signed)
    k = rope(k.view(-1, kv, hd), cos, sin_signed)

    def padded(t):  # (N, h, hd) -> (B, h, T, hd), zeros at padding (masked out by causality: they come last)
        out = t.new_zeros(batch * width, t.shape[1], hd)
        out[rows] = t
        return out.view(batch, width, -1, hd).transpose(1, 2)

    attn = F.scaled_dot_product_attention(padded(q), padded(k), padded(v.view(-1, kv, hd)), is_causal=True,
                                          enable_gqa=True, scale=scaling)  # (B, H, T, hd)
    x = torch.addmm(x, attn.transpose(1, 2).reshape(batch * width, -1)[rows], o.T)
    gate, up = (rms_norm(x, norm2, eps2) @ gate_up.T).chunk(2, -1)
    return torch.addmm(x, F.silu(gate).mul_(up), down.T)


def packed_last_layer(x, cos, sin_signed, rows, grid, last, qkv, qkv_bias, o, gate_up, down, norm1, norm2, eps1, eps2,
                      scaling, heads: int, kv: int, hd: int):
    """``packed_layer`` for a call's deepest layer: x (N, D) -> (B, D), the output at each row's last real token
    (``last`` (B,), its packed index) only, the one a score head reads. Keys and values for every token; the
    query, attention, output projection and MLP for B tokens (``modeling.last_token_layer``, packed)."""
    batch, width = grid.shape
    normed = rms_norm(x, norm1, eps1)
    q_rows = heads * hd
    kv_w = qkv[q_rows:]  # (2 Hkv hd, D): k|v rows, a contiguous view
    k, v = (normed @ kv_w.T if qkv_bias is None else torch.addmm(qkv_bias[q_rows:], normed, kv_w.T)).split(kv * hd, -1)
    q = normed[last] @ qkv[:q_rows].T if qkv_bias is None else torch.addmm(qkv_bias[:q_rows], normed[last], qkv[:q_rows].T)
    q = rope(q.view(batch, heads, hd), cos[last], sin_signed[last])  # (B, H, hd)
    k = rope(k.view(-1, kv, hd), cos, sin_signed)

    def padded(t):  # (N, kv, hd) -> (B, kv, T, hd), zeros at padding (masked below)
        out = t.new_zeros(batch * width, kv, hd)
        out[rows] = t
        return out.view(batch, width, kv, hd).transpose(1, 2)

    keys = grid.bool()[:, None, None, :]  # (B, 1, 1, T): the row's real tokens, all at or before its last
    attn = F.scaled_dot_product_attention(q[:, :, None], padded(k), padded(v.view(-1, kv, hd)), attn_mask=keys,
                                          enable_gqa=True, scale=scaling)  # (B, H, 1, hd)
    x = torch.addmm(x[last], attn.reshape(batch, -1), o.T)  # (B, D)
    gate, up = (rms_norm(x, norm2, eps2) @ gate_up.T).chunk(2, -1)
    return torch.addmm(x, F.silu(gate).mul_(up), down.T)


class PackedForward:
    """``model``'s scores at ratio 1 through the packed forward: ``self(input_ids, attention_mask, exits)``
    returns one (B,) float32 tensor per exit, as ``MatryoshkaModel.forward`` does."""

    def __init__(self, model, compile: bool = False):
        problem = packed_problem(model)
        if problem:
            raise ValueError(problem)
        self.model = model
        self.layers = [_Layer(layer) for layer in model.decoder.layers]
        attn = model.decoder.layers[0].self_attn
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.layer_fn = packed_layer
        self.last_token_only = True  # the deepest layer for the last tokens only (False: whole, for benchmarks)
        self.compiled = compile and self._compile()

    def _compile(self) -> bool:
        """One compiled graph for every layer and batch shape; eager on failure.

        Static weights and head sizes, dynamic token / batch / length sizes (``mark_dynamic`` in ``__call__``):
        ``dynamic=True``, every size symbolic, measured ~10% slower here (``benchmarks/bench_ceiling``). The
        warm-up takes the graph from its first (static) compile to the dynamic one and compiles batch 1
        (PyTorch specialises size 1), so requests do not recompile."""
        self.layer_fn = torch.compile(packed_layer, dynamic=False)
        device = next(self.model.parameters()).device
        self.last_token_only = False  # the compiled layer runs even where the first exit is layer 1
        try:
            with torch.inference_mode(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                for batch, length in ((2, 11), (3, 13), (1, 11)):  # 11, 13: no model dimension has these sizes
                    ids = torch.ones(batch, length, dtype=torch.long, device=device)
                    self(ids, torch.ones_like(ids), [self.model.exit_layers[0]])
        except Exception as error:  # noqa: BLE001  (whatever failed, the eager packed forward still works)
            self.layer_fn = packed_layer
            log.warning("torch.compile failed for the packed forward, it stays eager: %s",
                        (str(error).splitlines() or [type(error).__name__])[0][:300])
            return False
        finally:
            self.last_token_only = True
        return True

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 exits: Sequence[int]) -> list[torch.Tensor]:
        model, hd = self.model, self.head_dim
        batch, width = attention_mask.shape
        lengths = attention_mask.sum(1)  # (B,) right padded: real tokens first
        rows = attention_mask.reshape(-1).nonzero().squeeze(1)  # (N,)
        last = lengths.cumsum(0) - 1  # (B,) each row's last real token in the packed order
        x = model.decoder.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = model.decoder.rotary_emb(x, torch.arange(width, device=x.device)[None])  # (1, T, hd)
        sin_signed = torch.cat([-sin[0, :, : hd // 2], sin[0, :, hd // 2:]], -1)
        cos_rows = cos[0].repeat(batch, 1)[rows][:, None]  # (N, 1, hd)
        sin_rows = sin_signed.repeat(batch, 1)[rows][:, None]
        x = x.reshape(batch * width, -1)[rows]  # (N, D)
        grid = attention_mask
        if self.layer_fn is not packed_layer:  # compiled: the sizes that vary per call are dynamic, the rest static
            for t in (x, cos_rows, sin_rows, rows):
                torch._dynamo.mark_dynamic(t, 0)
            grid = attention_mask.detach().clone()  # marked, not the caller's tensor
            torch._dynamo.mark_dynamic(grid, 0)
            torch._dynamo.mark_dynamic(grid, 1)
        wanted, scores, stop = set(exits), {}, max(exits)
        for depth, w in enumerate(self.layers[:stop], start=1):
            weights = (w.qkv, w.qkv_bias, w.o, w.gate_up, w.down, w.norm1, w.norm2, w.eps1, w.eps2, w.scaling,
                       self.heads, self.kv_heads, hd)
            if depth == stop and self.last_token_only:  # nothing reads the other tokens' outputs of the deepest layer
                state = packed_last_layer(x, cos_rows, sin_rows, rows, grid, last, *weights)  # (B, D)
            else:
                x = self.layer_fn(x, cos_rows, sin_rows, rows, grid, *weights)
                state = x[last]
            if depth in wanted:
                head = model.score_heads[str(depth)]
                scores[depth] = head(model.decoder.norm(state)).squeeze(-1).float()
        return [scores[k] for k in exits]
