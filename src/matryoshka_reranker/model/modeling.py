"""Matryoshka re-ranker model: one file, read top to bottom.

A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM, ...) reads ``[bos] A: q \\n B: p \\n prompt``
(see ``inputs.py``). We reuse transformers' own embedding, decoder layers, rotary embedding and final
norm, and own only the layer loop, so that we can

* **exit early**: a score head ``Linear(hidden, 1)`` sits after every layer in
  ``range(start_layer, num_layers + 1, layer_sep)``; each reads the final-norm'd hidden state of the
  row's last real token. On a raw causal-LM checkpoint the heads start as the LM head's "Yes" row,
  so layer k's score is the logit-lens "Yes" logit at layer k. The loop stops after the deepest
  requested exit, and that last layer runs for each row's last real token only (the one position
  a head reads; its keys and values still come from every token): 1/k less work at exit k.
* **compress width**: before layer ``c`` (0-based, i.e. after c layers) in ``compress_layers``, the
  passage tokens of each row are merged in consecutive groups of ``compress_ratio``: a weighted sum
  with weights = the last real token's attention probabilities over them at layer ``c - 1`` (summed
  over heads, normalised per group). Query and prompt tokens are kept; positions are renumbered.

Deviation from upstream FlagEmbedding (documented in the README): upstream takes the compression
weights from position -1 of the padded batch, a padding token for shorter rows. We use each row's
last real token, so a row's scores do not depend on what else is in its batch.

Layer numbering: "exit layer k" is the output after k decoder layers (``hidden_states[k]`` in HF
terms); "compress at c" happens between layer c and layer c + 1 (1-based), i.e. it cannot change
the score at exit c itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.atomic import atomic_dir
from ..core.hardware import keep_freed_memory, warm_cpu_math

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "matryoshka.json"
HEADS_FILE = "score_heads.safetensors"


@dataclass
class LayerState:
    """Where a forward pass is: what a layer loop needs to continue (or to branch for training)."""

    hidden: torch.Tensor  # (B, T, D) output of the last layer run
    attention_mask: torch.Tensor  # (B, T) 1 = real token, right padded
    query_lengths: torch.Tensor  # (B,) [bos] + "A: query" + sep
    prompt_lengths: torch.Tensor  # (B,) sep + prompt
    depth: int  # decoder layers run so far
    layer_input: torch.Tensor | None = None  # (B, T, D) input of layer `depth`, for compression


class MatryoshkaModel(nn.Module):
    """A decoder with layer-wise score heads, early exit and passage-token compression."""

    def __init__(
        self,
        decoder: nn.Module,
        start_layer: int = 4,
        layer_sep: int = 1,
        head_init: torch.Tensor | None = None,
    ):
        super().__init__()
        missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, name)]
        if missing:  # e.g. Phi-2 (final_layernorm), GPT-2 / NeoX (wte, h): not a Llama-family decoder
            raise ValueError(f"{type(decoder).__name__} has no {', '.join(missing)}: not the Llama-family layout "
                             "(embed_tokens, layers, norm, rotary_emb) the Matryoshka model runs; it is not supported "
                             "(Llama, Mistral, Qwen2, Qwen3 and SmolLM are)")
        warm_cpu_math()  # before any threaded cos/sin (the rotary embedding): see its docstring
        keep_freed_memory()  # no page faults for every activation (core/hardware.py)
        config = decoder.config
        self.num_layers = config.num_hidden_layers
        if not 1 <= start_layer <= self.num_layers:
            raise ValueError(f"start_layer must be in [1, {self.num_layers}], got {start_layer}")
        if layer_sep < 1:
            raise ValueError(f"layer_sep must be >= 1, got {layer_sep}")
        self.decoder = decoder  # transformers' base model: embed_tokens, layers, norm, rotary_emb
        self.start_layer, self.layer_sep = start_layer, layer_sep
        self.exit_layers = list(range(start_layer, self.num_layers + 1, layer_sep))
        weight = next(decoder.parameters())
        self.score_heads = nn.ModuleDict(
            {str(k): nn.Linear(config.hidden_size, 1, bias=False, device=weight.device, dtype=weight.dtype)
             for k in self.exit_layers}
        )
        if head_init is not None:
            with torch.no_grad():
                for head in self.score_heads.values():
                    head.weight.copy_(head_init.reshape(1, -1))

    @property
    def config(self):
        return self.decoder.config


    @property
    def max_sequence_length(self) -> int:
        """Longest input our full causal mask handles exactly (sliding-window attention is not modelled)."""
        window = getattr(self.config, "sliding_window", None)
        limit = self.config.max_position_embeddings
        return min(limit, window) if window else limit

    def input_length_problem(self, longest: int) -> str | None:
        """Why pairs of up to ``longest`` tokens (``PairEncoder.longest``) cannot be scored exactly, or None:
        the one check scoring, training and the export share."""
        if longest <= self.max_sequence_length:
            return None
        return (f"the input format allows {longest} tokens per pair, more than the model attends to exactly "
                f"({self.max_sequence_length}: position limit or sliding window)")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_lengths: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        cutoff_layers: int | Sequence[int] | None = None,
        compress_layers: Sequence[int] = (),
        compress_ratio: int = 1,
    ) -> list[torch.Tensor]:
        """Scores (B,) float32 at each cutoff layer, in the order given (default: deepest exit)."""
        layers = self.check_cutoff_layers(cutoff_layers)
        compress_layers = self.check_compression(compress_layers, compress_ratio)
        if compress_layers and (query_lengths is None or prompt_lengths is None):
            raise ValueError("compression needs query_lengths and prompt_lengths (see PairEncoder)")
        state = self.embed(input_ids, attention_mask, query_lengths, prompt_lengths)
        _, scores = self.advance(state, max(layers), set(layers), compress_layers, compress_ratio,
                                 last_token_only=True)
        return [scores[k] for k in layers]

    def embed(self, input_ids, attention_mask, query_lengths=None, prompt_lengths=None) -> LayerState:
        batch = input_ids.shape[0]
        zeros = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        return LayerState(
            hidden=self.decoder.embed_tokens(input_ids),  # (B, T, D)
            attention_mask=attention_mask,
            query_lengths=zeros if query_lengths is None else query_lengths,
            prompt_lengths=zeros if prompt_lengths is None else prompt_lengths,
            depth=0,
        )

    def advance(
        self,
        state: LayerState,
        stop: int,
        exits: set[int] | Sequence[int],
        compress_layers: Sequence[int] = (),
        compress_ratio: int = 1,
        states: bool = False,
        last_token_only: bool = False,
    ) -> tuple[LayerState, dict[int, torch.Tensor]]:
        """Runs layers ``state.depth + 1 .. stop``, scoring at every layer in ``exits``.

        Training branches one state into a full-width and a compressed continuation, so the
        layers before the first compression layer run once per step. ``states=True`` returns
        each exit's final-norm'd last-token state (B, D) instead of its score (head fitting).
        ``last_token_only=True`` (scoring, nothing continues from the returned state): layer ``stop``
        runs for each row's last real token only (``last_token_layer``), and the returned state holds
        that token alone, (B, 1, D).
        """
        scores: dict[int, torch.Tensor] = {}
        bias = cos_sin = None
        for index in range(state.depth, stop):  # `index` layers have run; layer index+1 is next
            if index in compress_layers and compress_ratio > 1:
                state = self.compress(state, compress_ratio)
                bias = cos_sin = None
            if cos_sin is None:
                bias = attention_bias(state.attention_mask, state.hidden.dtype,
                                      self.config._attn_implementation)  # None (SDPA is_causal) or (1, 1, T, T)
                positions = torch.arange(state.hidden.shape[1], device=state.hidden.device)[None]
                cos_sin = self.decoder.rotary_emb(state.hidden, positions)  # 2 x (1, T, head_dim)
            layer_input, layer = state.hidden, self.decoder.layers[index]
            if last_token_only and index + 1 == stop and trim_problem(layer) is None:
                hidden = last_token_layer(layer, layer_input, state.attention_mask, self.decoder.rotary_emb)
                ones = state.attention_mask.new_ones(hidden.shape[0], 1)  # (B, 1): the last token is all there is
                state = replace(state, hidden=hidden[:, None], attention_mask=ones, depth=stop, layer_input=None)
            else:
                hidden = layer(layer_input, attention_mask=bias, position_embeddings=cos_sin, position_ids=positions)
                state = replace(state, hidden=hidden, depth=index + 1, layer_input=layer_input)
            if index + 1 in exits:
                scores[index + 1] = self.exit_state(state) if states else self.score(state)
        return state, scores

    def exit_state(self, state: LayerState) -> torch.Tensor:
        """(B, D): the final-norm'd hidden state of each row's last real token, what a head reads."""
        last = state.attention_mask.sum(1) - 1  # (B,)
        return self.decoder.norm(gather_rows(state.hidden, last))

    def score(self, state: LayerState) -> torch.Tensor:
        """(B,) float32: the exit head on the final-norm'd last real token, in the head's own dtype and
        outside any autocast (``MatryoshkaReranker`` keeps heads fp32 under a bf16 decoder, bf16-autocast
        training keeps them fp32 too: bf16 logits step by 0.25 at |score| ~ 48 and tied most of a
        query's candidates at exit 8)."""
        head = self.score_heads[str(state.depth)]
        x = self.exit_state(state)  # (B, D)
        with torch.autocast(x.device.type, enabled=False):  # bf16 autocast training: fp32 logits all the same
            return head(x.to(next(head.parameters()).dtype)).squeeze(-1).float()

    def compress(self, state: LayerState, ratio: int) -> LayerState:
        """Merges passage tokens in groups of ``ratio`` using the last token's attention at layer depth."""
        if state.layer_input is None:
            raise ValueError("compression needs at least one layer run before it")
        layer = self.decoder.layers[state.depth - 1]
        weights = last_token_attention(
            layer, state.layer_input, state.attention_mask, self.decoder.rotary_emb
        )  # (B, T)
        hidden, mask = merge_passage_tokens(
            state.hidden, state.attention_mask, state.query_lengths, state.prompt_lengths, weights, ratio
        )
        return replace(state, hidden=hidden, attention_mask=mask, layer_input=None)

    def truncate(self, exit_layer: int) -> MatryoshkaModel:
        """The first ``exit_layer`` decoder layers with the heads of exits <= ``exit_layer``: the starting
        point of an exit specialist (``training/specialist.py``). Layers, norm, embeddings and heads are
        shared with ``self``, not copied, and ``self`` is cut too (its decoder loses the later layers), so
        take it from a model that is not used afterwards; exit-k scores do not change."""
        if exit_layer not in self.exit_layers[:-1]:
            raise ValueError(f"cannot cut after layer {exit_layer}: not an exit below the deepest "
                             f"(exits {self.exit_layers})")
        decoder = self.decoder
        decoder.layers = decoder.layers[:exit_layer]
        decoder.config.num_hidden_layers = exit_layer
        if getattr(decoder.config, "layer_types", None):  # per-layer attention kinds, one per layer
            decoder.config.layer_types = decoder.config.layer_types[:exit_layer]
        cut = MatryoshkaModel(decoder, self.start_layer, self.layer_sep)
        cut.score_heads = nn.ModuleDict({k: head for k, head in self.score_heads.items() if int(k) <= exit_layer})
        return cut.train(self.training)

    # -------------------------------------------------------------- validation
    def check_cutoff_layers(self, cutoff_layers) -> list[int]:
        if cutoff_layers is None:
            return [self.exit_layers[-1]]
        layers = [cutoff_layers] if isinstance(cutoff_layers, int) else list(cutoff_layers)
        if not layers:
            raise ValueError("cutoff_layers is empty")
        bad = [k for k in layers if k not in self.exit_layers]
        if bad:
            raise ValueError(
                f"cutoff layer(s) {bad} have no score head; available exit layers: "
                f"{self.exit_layers[0]}..{self.exit_layers[-1]} every {self.layer_sep}"
            )
        return layers

    def check_compression(self, compress_layers, compress_ratio) -> tuple[int, ...]:
        if not isinstance(compress_ratio, int) or isinstance(compress_ratio, bool) or compress_ratio < 1:
            raise ValueError(f"compress_ratio must be an integer >= 1, got {compress_ratio!r}")
        layers = tuple(sorted(set(compress_layers or ())))
        bad = [c for c in layers if not 1 <= c < self.num_layers]
        if bad:
            raise ValueError(f"compress layer(s) {bad} outside [1, {self.num_layers - 1}]")
        if compress_ratio == 1:
            return ()
        for c in layers:  # the merge weights recompute layer c's attention (``last_token_attention``)
            problem = layout_problem(self.decoder.layers[c - 1])
            if problem is not None:
                raise CompressionLayoutError(f"cannot compress at layer {c}: the merge weights recompute that layer's "
                                             f"attention, which is only reproduced for Llama-style layers; {problem}")
        return layers

    # ------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        start_layer: int | None = None,
        layer_sep: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        tokenizer=None,
    ) -> MatryoshkaModel:
        """Loads a saved Matryoshka model, or wraps a plain causal-LM checkpoint (heads from "Yes")."""
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from .inputs import yes_token_id

        path = Path(path)
        dtype = dtype or torch.float32
        meta_file = path / CONFIG_FILE
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            if meta.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(f"{path} was saved by a newer matryoshka-reranker (format {meta['format_version']})")
            for name, given in (("start_layer", start_layer), ("layer_sep", layer_sep)):
                if given is not None and given != meta[name]:
                    raise ValueError(f"{path} was trained with {name}={meta[name]}, not {given}")
            decoder = AutoModel.from_pretrained(path, dtype=dtype)
            model = cls(decoder, meta["start_layer"], meta["layer_sep"])
            heads = load_file(path / HEADS_FILE)
            model.score_heads.load_state_dict({k: v.to(dtype) for k, v in heads.items()}, strict=True)
        else:
            if not (path / "config.json").exists():
                raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
            yes_row = lm.get_output_embeddings().weight[yes_token_id(tokenizer)].detach().clone()
            model = cls(lm.base_model, start_layer or 4, layer_sep or 1, head_init=yes_row)
        model.eval()
        model = model.to(device) if device is not None else model
        model.check_architecture()
        return model

    @torch.no_grad()
    def check_architecture(self) -> None:
        """Raises ``ValueError`` when our layer loop (embed, decoder layers, final norm) does not reproduce the
        decoder's own forward on a few tokens: an architecture whose base model does more than that (Granite
        scales its embeddings, others their residuals in the model's forward) would be scored wrongly, silently.
        Costs one forward of 6 tokens at load."""
        weight = next(self.parameters())
        ids = (torch.arange(6, device=weight.device) * 7 + 3)[None] % self.config.vocab_size  # (1, 6)
        own = self.decoder(input_ids=ids).last_hidden_state[0, -1].float()  # (D,) final-norm'd
        state, _ = self.advance(self.embed(ids, torch.ones_like(ids)), self.num_layers, ())
        ours = self.decoder.norm(state.hidden[0, -1]).float()
        tolerance = 1e-3 if weight.dtype == torch.float32 else 5e-2
        diff = (ours - own).abs().max().item() / max(1.0, own.abs().max().item())
        if not diff <= tolerance:  # NaN too
            raise ValueError(f"{type(self.decoder).__name__}: this architecture's forward is not the embed -> decoder "
                             f"layers -> norm loop the Matryoshka model runs (relative difference {diff:.3g} on a "
                             "6-token check); it is not supported (Llama, Mistral, Qwen2, Qwen3 and SmolLM are)")

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        """Writes decoder (safetensors), heads and their layout atomically into ``path``."""
        with atomic_dir(path) as tmp:
            self.decoder.save_pretrained(tmp)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.score_heads.state_dict().items()},
                      str(tmp / HEADS_FILE))
            meta = {"format_version": FORMAT_VERSION, "start_layer": self.start_layer,
                    "layer_sep": self.layer_sep, "exit_layers": self.exit_layers}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

    def compile_layers(self) -> bool:
        """``torch.compile`` every decoder layer for inference, with dynamic shapes; False (and the
        layers left eager) where no compiler works here.

        Per layer rather than the whole model: the layer loop, early exit and token merge stay plain
        Python, and the layers share one compiled graph (their weights are graph inputs), so one
        compile serves every exit, ratio, batch size and length (Inductor: C++ on CPU, Triton on
        CUDA; cost and gain measured by ``benchmarks/bench_compile.py``, README "Speed"). The warm-up
        compiles batch 2 and batch 1 (PyTorch specialises size 1) at a length no model dimension
        has, under ``inference_mode`` as ``compute_score`` runs, so that requests do not recompile.
        Any failure there (no C++ compiler, an unsupported op, Dynamo's recompile limit, which every
        compiled model in a process shares, since all layers run one transformers function) reverts
        to eager with a warning. Calls under other settings (grad mode, thread count) recompile once.
        """
        import torch._dynamo

        for layer in self.decoder.layers:
            layer.compile(dynamic=True)
        device = next(self.parameters()).device
        try:
            with torch.inference_mode(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                for batch in (2, 1):
                    ids = torch.ones(batch, 11, dtype=torch.long, device=device)  # 11: not a head/hidden size
                    self(ids, torch.ones_like(ids), cutoff_layers=[self.exit_layers[0]])
        except Exception as error:  # noqa: BLE001  (whatever failed, eager scoring still works)
            for layer in self.decoder.layers:
                layer._compiled_call_impl = None  # what nn.Module.compile set; None = the eager forward
            first = (str(error).splitlines() or [type(error).__name__])[0]
            log.warning("torch.compile failed here, scoring stays eager: %s", first[:300])
            return False
        return True

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Recompute each decoder layer in backward (memory for time), as transformers does."""
        self.decoder.activation_checkpointing_enable(**kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        # The HF Trainer calls this name.
        self.decoder.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)


# ---------------------------------------------------------------------- helpers
def attention_bias(mask: torch.Tensor, dtype: torch.dtype, implementation: str = "eager") -> torch.Tensor | None:
    """What the decoder layers get as ``attention_mask``: causal attention, no padding mask.

    Inputs are right padded, so a real token never has a padding token to its left: causal
    attention alone already keeps every real token's state (and score) exactly as with a padding
    mask; only the padding positions' own states differ, and nothing reads them. SDPA then runs its
    fused causal kernel (``None`` -> ``is_causal=True``) instead of adding a (B, 1, T, T) float mask,
    and eager attention (which adds no causal mask of its own) gets one (1, 1, T, T) causal bias
    shared by the batch. ``mask`` (B, T) only gives the width and device.
    """
    if implementation != "eager":
        return None
    width = mask.shape[1]
    positions = torch.arange(width, device=mask.device)
    causal = positions[None, :] <= positions[:, None]  # (T, T) key <= query
    bias = torch.zeros(causal.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~causal, torch.finfo(dtype).min)[None, None]  # (1, 1, T, T)


def gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B,) -> (B, D): one position per row."""
    return hidden.gather(1, index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)


class CompressionLayoutError(ValueError):
    """Compression asked for at a layer whose attention ``last_token_attention`` does not reproduce (any width > 1
    is refused there; ratio 1 runs)."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def last_token_attention(layer: nn.Module, layer_input: torch.Tensor, mask: torch.Tensor, rotary_emb) -> torch.Tensor:
    """(B, T): the last real token's attention probabilities at ``layer``, summed over heads.

    Recomputes one query row per sequence from the layer's own norm and projections instead of
    asking the layer for full (T x T) attention matrices, so the layers themselves keep SDPA. That
    reproduces the layers ``layout_problem`` accepts (``check_compression`` refuses the others: SmolLM3's
    RoPE-free layers, for one, would get RoPE here and silently wrong weights).
    """
    x = layer.input_layernorm(layer_input)  # (B, T, D)
    return _last_query_probs(layer.self_attn, x, mask, rotary_emb).sum(dim=(1, 2))  # (B, T)


def last_token_layer(layer: nn.Module, layer_input: torch.Tensor, mask: torch.Tensor, rotary_emb) -> torch.Tensor:
    """(B, D): ``layer``'s output at each row's last real token only, the one position a score reads.

    At the deepest layer a call runs, every other position's output is thrown away, so this computes
    keys and values for all tokens but the query, attention, output projection and MLP for one token
    per row: ~6% of the layer's GEMM work on SmolLM2-135M (k and v are 6.25% of its multiply-adds per
    token). The same layer as transformers runs it (eager attention: float32 softmax), for the layers
    ``trim_problem`` accepts.
    """
    attn = layer.self_attn
    batch, width, _ = layer_input.shape
    x = layer.input_layernorm(layer_input)  # (B, T, D)
    probs = _last_query_probs(attn, x, mask, rotary_emb)  # (B, Hkv, G, T) float32
    value = attn.v_proj(x).view(batch, width, probs.shape[1], attn.head_dim)  # (B, T, Hkv, hd)
    context = torch.einsum("bkgt,btkd->bkgd", probs.to(value.dtype), value).reshape(batch, 1, -1)  # (B, 1, H*hd)
    # 3-D like the full layer's inputs, so that an ONNX export reads the same weight initializers (a 2-D
    # Linear exports as a Gemm whose folded transposes would store each weight a second time)
    hidden = gather_rows(layer_input, mask.sum(1) - 1)[:, None] + attn.o_proj(context)  # (B, 1, D)
    return (hidden + layer.mlp(layer.post_attention_layernorm(hidden)))[:, 0]


# Layer classes whose forward is exactly: pre-norm attention (split-half RoPE on the whole head, per-head q/k
# norms for Qwen3) + residual, pre-norm MLP + residual. An allowlist, not a shape check: look-alikes with the same
# sub-modules differ in their forward (SmolLM3 skips RoPE every 4th layer, Granite scales the residuals, OLMo
# clips q/k/v, Helium and Ernie 4.5 interleave RoPE, GLM and Nemotron rotate part of the head).
TRIMMABLE_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}


def trim_problem(layer: nn.Module) -> str | None:
    """Why ``last_token_layer`` would not reproduce ``layer``, or None. Other layers run whole: the same
    scores, without the saving. (Benchmarks and tests patch this name to run the deepest layer whole.)"""
    return layout_problem(layer)


def layout_problem(layer: nn.Module) -> str | None:
    """Why our recomputation of ``layer``'s attention (``_last_query_probs``) would not be the layer's own, or None:
    what both the last-token layer and compression's merge weights rely on."""
    name = type(layer).__name__
    if name not in TRIMMABLE_LAYERS:
        return f"{name} is not one of the layer classes the last-token layer reproduces ({', '.join(TRIMMABLE_LAYERS)})"
    attention = getattr(layer, "self_attn", None)
    children = {child for child, _ in layer.named_children()}
    if attention is None or children != _LAYER_CHILDREN or not {c for c, _ in attention.named_children()} <= _ATTENTION_CHILDREN:
        return f"{name} has other sub-modules than a Llama-style layer"
    config = getattr(attention, "config", None)
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0) or getattr(config, "clip_qkv", None):
        return f"{name}: partial rotary or clipped q/k/v"
    return None


def _last_query_probs(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor, rotary_emb) -> torch.Tensor:
    """(B, Hkv, G, T) float32: each row's last real token's attention probabilities (x: the normed layer input)."""
    batch, width, _ = x.shape
    head_dim = attn.head_dim
    last = mask.sum(1) - 1  # (B,)
    query = attn.q_proj(gather_rows(x, last)[:, None]).view(batch, -1, head_dim)  # (B, H, hd); 3-D: see last_token_layer
    key = attn.k_proj(x).view(batch, width, -1, head_dim)  # (B, T, Hkv, hd)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
        query, key = attn.q_norm(query), attn.k_norm(key)
    positions = torch.arange(width, device=x.device)[None]
    cos, sin = rotary_emb(x, positions)  # (1, T, hd)
    cos_last, sin_last = cos[0][last][:, None], sin[0][last][:, None]  # (B, 1, hd)
    query = query * cos_last + _rotate_half(query) * sin_last  # (B, H, hd)
    key = key * cos[:, :, None] + _rotate_half(key) * sin[:, :, None]  # (B, T, Hkv, hd)
    groups = query.shape[1] // key.shape[2]
    query = query.view(batch, key.shape[2], groups, head_dim)  # (B, Hkv, G, hd)
    logits = torch.einsum("bkgd,btkd->bkgt", query.float(), key.float()) * attn.scaling  # (B, Hkv, G, T)
    logits = logits.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


def merge_passage_tokens(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    query_lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
    weights: torch.Tensor,
    ratio: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges each row's passage tokens in consecutive groups of ``ratio``.

    hidden (B, T, D), mask (B, T), lengths (B,), weights (B, T) -> hidden (B, T', D), mask (B, T').
    Each group becomes the weighted sum of its members, weights normalised within the group (a
    last partial group over its real members; a group whose weights are all zero is averaged).
    Written with scatter/gather only (no data-dependent Python loops) so it exports to ONNX.
    """
    batch, width, dim = hidden.shape
    lengths = mask.sum(1)  # (B,)
    passage = lengths - query_lengths - prompt_lengths  # (B,)
    groups = torch.div(passage + ratio - 1, ratio, rounding_mode="floor")  # (B,)
    new_lengths = query_lengths + groups + prompt_lengths  # (B,)

    t = torch.arange(width, device=hidden.device)[None]  # (1, T)
    start, end = query_lengths[:, None], (query_lengths + passage)[:, None]  # (B, 1)
    in_passage = (t >= start) & (t < end)  # (B, T)
    is_real = t < lengths[:, None]
    # Target slot of every old token; padding goes to a dump slot at index T, dropped below.
    target = torch.where(t < start, t, start + torch.div(t - start, ratio, rounding_mode="floor"))
    target = torch.where(t >= end, t - passage[:, None] + groups[:, None], target)
    target = torch.where(is_real, target, torch.full_like(target, width))  # (B, T)

    w = torch.where(in_passage, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    group_sum = torch.zeros(batch, width + 1, device=hidden.device).scatter_add(1, target, w)
    group_size = torch.zeros(batch, width + 1, device=hidden.device).scatter_add(1, target, in_passage.float())
    token_sum, token_size = group_sum.gather(1, target), group_size.gather(1, target)
    merged = torch.where(token_sum > 0, w / token_sum.clamp_min(1e-30), 1.0 / token_size.clamp_min(1.0))
    coef = torch.where(in_passage, merged, is_real.float())  # query/prompt 1, padding 0

    # Sums in float32 (half-precision sums lose bits; ONNX Runtime's CPU provider has no float16 scatter-add).
    out = torch.zeros(batch, width + 1, dim, dtype=torch.float32, device=hidden.device)
    out = out.scatter_add(1, target[..., None].expand(-1, -1, dim), hidden.float() * coef[..., None])
    new_width = new_lengths.max()
    keep = torch.arange(width, device=hidden.device) < new_width  # (T,), at least T' slots exist
    index = torch.nonzero(keep).squeeze(1)  # (T',) data-dependent length, export friendly
    if not torch.jit.is_tracing():  # tells torch.export T' != 1 (query and prompt keep >= 2 tokens)
        torch._check(index.shape[0] >= 2)
    out = out.index_select(1, index).to(hidden.dtype)  # (B, T', D)
    new_mask = (index[None] < new_lengths[:, None]).to(mask.dtype)  # (B, T')
    return out, new_mask
