"""User-facing scoring API, mirroring FlagEmbedding's ``LayerWiseFlagLLMReranker.compute_score``.

>>> from matryoshka_reranker import MatryoshkaReranker
>>> reranker = MatryoshkaReranker("embedded:smollm2-135m-instruct")
>>> reranker.compute_score([("what is panda?", "The giant panda is a bear.")], cutoff_layers=[8, 30])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .assets import resolve_model_path
from .hardware import pick_device, pick_dtype
from .inputs import DEFAULT_PROMPT, PairEncoder, as_pair_list

Pair = tuple[str, str]


class MatryoshkaReranker:
    """Scores (query, passage) pairs at any exit layer and compression ratio.

    ``peft_path`` takes one adapter folder or a list, merged in order (self-distillation, then the
    layer adapter, then the token adapter for the ratio you will use). ``start_layer`` and
    ``layer_sep`` only matter for a raw causal-LM checkpoint (defaults 4 and 1); a trained model
    keeps the ones it was saved with. ``dtype`` defaults to float32 on CPU, bfloat16 on CUDA.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        peft_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        start_layer: int | None = None,
        layer_sep: int | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        prompt: str = DEFAULT_PROMPT,
        query_max_len: int | None = None,
    ):
        from transformers import AutoTokenizer

        from .adapters import merge_adapters
        from .modeling import MatryoshkaModel

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = resolve_model_path(model_name_or_path)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = MatryoshkaModel.from_pretrained(
            path, start_layer=start_layer, layer_sep=layer_sep, dtype=self.dtype, tokenizer=self.tokenizer
        )
        if peft_path is not None:
            paths = [peft_path] if isinstance(peft_path, (str, os.PathLike)) else list(peft_path)
            model = merge_adapters(model, paths)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.encoder = PairEncoder(self.tokenizer, prompt=prompt, max_length=max_length, query_max_len=query_max_len)
        longest = max_length + len(self.encoder.sep) + len(self.encoder.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if longest > model.max_sequence_length:
            raise ValueError(f"max_length={max_length} plus the prompt ({longest} tokens) exceeds what the model "
                             f"attends to exactly ({model.max_sequence_length}: position limit or sliding window)")
        self.model_path = Path(path)

    @classmethod
    def from_pipeline(cls, params="params.yaml", ratio: int = 1, **kwargs) -> MatryoshkaReranker:
        """The pipeline's trained model for one width: base + ``params.adapter_stack(ratio)``.

        ``params`` is a ``Params`` or a params.yaml path. The stack is [self_distill, layer] for
        ratio 1 and adds ``token-ratio-<ratio>`` otherwise; score it with the same ratio
        (``compute_score(..., compress_layers=params.compression.layers, compress_ratio=ratio)``).
        """
        from .config import Params, load_params

        params = params if isinstance(params, Params) else load_params(params)
        stack = params.adapter_stack(ratio)
        missing = [str(p) for p in stack if not (Path(p) / "adapter_config.json").exists()]
        if missing:
            trained = sorted(p.name for p in Path(params.paths.compensation).glob("token-ratio-*"))
            raise FileNotFoundError(f"no trained adapter at {', '.join(missing)} for ratio {ratio} "
                                    f"(token adapters present: {trained or 'none'})")
        m = params.model
        options = dict(start_layer=m.start_layer, layer_sep=m.layer_sep, max_length=m.max_length,
                       prompt=m.prompt, query_max_len=m.query_max_len, dtype=None if m.dtype == "auto" else m.dtype)
        return cls(m.name_or_path, peft_path=stack, **{**options, **kwargs})

    @property
    def exit_layers(self) -> list[int]:
        return self.model.exit_layers

    @torch.inference_mode()
    def compute_score(
        self,
        pairs: Pair | Sequence[Pair],
        cutoff_layers: int | Sequence[int] | None = None,
        compress_layers: Sequence[int] | None = None,
        compress_ratio: int = 1,
        normalize: bool = False,
        batch_size: int | None = None,
    ) -> float | list[float] | list[list[float]]:
        """Relevance scores, higher = more relevant.

        One cutoff layer (an int, or a list of one) gives ``list[float]``; several give one list per
        layer in the order given. A single ``(query, passage)`` tuple gives a float (or one float
        per layer). ``normalize=True`` applies a sigmoid.
        """
        pairs, single = as_pair_list(pairs)
        layers = self.model.check_cutoff_layers(cutoff_layers)
        self.model.check_compression(compress_layers or (), compress_ratio)
        encoded = [self.encoder.encode(q, p) for q, p in pairs]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))  # fewer pad tokens
        scores = torch.empty(len(layers), len(encoded))
        size = batch_size or self.batch_size
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            batch = {k: v.to(self.device) for k, v in self.encoder.collate([encoded[i] for i in rows]).items()}
            outputs = self.model(**batch, cutoff_layers=layers, compress_layers=compress_layers or (),
                                 compress_ratio=compress_ratio)
            for j, layer_scores in enumerate(outputs):
                scores[j, rows] = layer_scores.float().cpu()
        if normalize:
            scores = torch.sigmoid(scores)
        result = scores.tolist()
        if single:
            result = [row[0] for row in result]
            return result[0] if _one_layer(cutoff_layers) else result
        return result[0] if _one_layer(cutoff_layers) else result


def _one_layer(cutoff_layers) -> bool:
    return cutoff_layers is None or isinstance(cutoff_layers, int) or len(cutoff_layers) == 1
