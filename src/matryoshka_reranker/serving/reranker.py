"""User-facing PyTorch scoring API, mirroring FlagEmbedding's ``LayerWiseFlagLLMReranker.compute_score``
and sentence-transformers' ``CrossEncoder.rank``.

>>> from matryoshka_reranker import MatryoshkaReranker
>>> reranker = MatryoshkaReranker("embedded:smollm2-135m-instruct")
>>> reranker.compute_score([("what is panda?", "The giant panda is a bear.")], cutoff_layers=[8, 30])
>>> reranker.rank("what is panda?", ["The giant panda is a bear.", "Paris is in France."], top_k=1)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.assets import load_tokenizer, resolve_model_path
from ..core.hardware import pick_device, pick_inference_dtype
from ..model.inputs import InputFormat, as_pair_list, resolve_format
from .ranking import rank_documents

Pair = tuple[str, str]
log = logging.getLogger(__name__)


class MatryoshkaReranker:
    """Scores (query, passage) pairs at any exit layer and compression ratio.

    ``peft_path`` takes one adapter folder or a list, merged in order (self-distillation, then the
    layer adapter, then the token adapter for the ratio you will use). The input format (prompt,
    query and passage token budgets) is the one saved with the adapters; ``input_format`` only
    needs giving for a raw checkpoint (and must agree with a saved one). ``start_layer`` and
    ``layer_sep`` only matter for a raw causal-LM checkpoint: by default the layout the first adapter was
    trained with (its training log), else 4 and 1. ``compress_layers``
    and ``compress_ratio`` set the default width of ``compute_score`` and ``rank``; left out, the width the
    top token adapter of the stack was trained at (its training log: a ratio-2 stack scores at ratio 2 at its
    layers), else full width; another width than the token adapter's is scored as asked, with a warning (another
    ratio > 1 without ``compress_layers`` compresses at the adapter's layers, not nowhere). ``dtype``
    ("auto" by default) is bfloat16 on CUDA and on CPUs with AMX-BF16 tiles (~3x fp32's speed there,
    ranking kept: README "Speed"), float32 on other CPUs; ``self.dtype`` says which. ``compile=True`` compiles the decoder layers with
    ``torch.compile`` at construction (one compile for every exit, ratio and batch shape; eager if
    no compiler works here; measured in the README's Speed section); ``self.compiled`` says which.
    ``packed=True`` scores uncompressed calls through the padding-free forward (``model/packed.py``: real
    tokens only, stacked projections; float32 Llama-family models, else the default forward with a
    warning; compiled too with ``compile=True``); ``self.packed`` is None where it is not used.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        peft_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        input_format: InputFormat | None = None,
        start_layer: int | None = None,
        layer_sep: int | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        compress_layers: Sequence[int] | None = None,
        compress_ratio: int | None = None,
        compile: bool = False,
        packed: bool = False,
    ):
        from ..model.adapters import merge_adapters, stack_compression, trained_layout
        from ..model.modeling import MatryoshkaModel

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = resolve_model_path(model_name_or_path)
        adapters = [] if peft_path is None else (
            [peft_path] if isinstance(peft_path, (str, os.PathLike)) else list(peft_path))
        self.input_format = resolve_format([path, *adapters], input_format)
        self.device = pick_device(device)
        self.dtype = pick_inference_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(path)
        if adapters and start_layer is None and layer_sep is None:  # the layout the adapters were trained with
            start_layer, layer_sep = trained_layout(adapters[0]) or (None, None)
        model = MatryoshkaModel.from_pretrained(
            path, start_layer=start_layer, layer_sep=layer_sep, dtype=self.dtype, tokenizer=self.tokenizer
        )
        if adapters:
            model = merge_adapters(model, adapters)
        self.model = model.to(self.device).eval()
        self.model.score_heads.float()  # (hidden -> 1) per exit: fp32 scores even under a bf16 decoder
        self.batch_size = batch_size
        self.encoder = self.input_format.encoder(self.tokenizer)
        too_long = model.input_length_problem(self.encoder.longest)
        if too_long:
            raise ValueError(too_long)
        trained = stack_compression(adapters)  # the top token adapter's width, if any
        if compress_ratio is None:
            compress_ratio = trained[1] if trained else 1
        recorded = compress_layers is None and bool(trained) and compress_ratio > 1
        if compress_layers is None:  # another ratio > 1 than the adapter's still compresses where it was trained to
            compress_layers = trained[0] if recorded else ()
        compress_layers = tuple(compress_layers)
        try:
            width = (self.model.check_compression(compress_layers, compress_ratio), compress_ratio)  # layers sorted
        except ValueError as err:
            from ..model.modeling import CompressionLayoutError  # loaded with the model above

            if recorded and not isinstance(err, CompressionLayoutError):  # e.g. the token adapter of a deeper model
                raise ValueError(f"{err}: the compression layers the token adapter was trained at (its training "
                                 "log); give compress_layers, or compress_ratio=1") from None
            raise
        _check_width(width[0], compress_ratio)
        if trained and width != (tuple(sorted(set(trained[0]))), trained[1]):
            log.warning("the adapter stack was trained to score at ratio %d (compressed at layers %s); scoring at "
                        "ratio %d%s as asked", trained[1], list(trained[0]), compress_ratio,
                        f" (layers {list(compress_layers)})" if compress_ratio > 1 else "")
        self.compress_layers, self.compress_ratio = compress_layers, compress_ratio
        self.model_path = Path(path)
        self.compiled = compile and self.model.compile_layers()
        self.packed = None  # the padding-free forward for uncompressed calls (model/packed.py)
        if packed:
            from ..model.packed import PackedForward, packed_problem

            problem = packed_problem(self.model)
            if problem:
                log.warning("packed=True: %s; scoring stays on the default forward", problem)
            else:
                self.packed = PackedForward(self.model, compile=compile)

    @classmethod
    def from_pipeline(cls, params="params.yaml", ratio: int = 1, **kwargs) -> MatryoshkaReranker:
        """The pipeline's trained model for one width: base + ``params.adapter_stack(ratio)``.

        ``params`` is a ``Params`` or a params.yaml path. The stack is [self_distill, layer] for
        ratio 1 and adds ``token-ratio-<ratio>`` otherwise; scoring uses that ratio at
        ``compression.layers`` by default, as the adapters were trained.
        """
        from ..config import TOKEN_ADAPTER_PREFIX, Params, load_params

        params = params if isinstance(params, Params) else load_params(params)
        stack = params.adapter_stack(ratio)
        missing = [str(p) for p in stack if not (Path(p) / "adapter_config.json").exists()]
        if missing:
            trained = sorted(p.name for p in Path(params.paths.compensation).glob(f"{TOKEN_ADAPTER_PREFIX}*"))
            raise FileNotFoundError(f"no trained adapter at {', '.join(missing)} for ratio {ratio} "
                                    f"(token adapters present: {trained or 'none'})")
        m = params.model
        options = dict(start_layer=m.start_layer, layer_sep=m.layer_sep, input_format=m.input_format,
                       dtype=None if m.dtype == "auto" else m.dtype,
                       compress_layers=params.compression.layers if ratio > 1 else (), compress_ratio=ratio)
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
        compress_ratio: int | None = None,
        normalize: bool = False,
        batch_size: int | None = None,
        compress_layer: Sequence[int] | None = None,
    ) -> float | list[float] | list[list[float]]:
        """Relevance scores, higher = more relevant.

        One cutoff layer (an int, or a list of one) gives ``list[float]``; several give one list per
        layer in the order given. A single pair (a ``(query, passage)`` tuple or a 2-list of
        strings, as in FlagEmbedding) gives a float (or one float per layer). ``normalize=True``
        applies a sigmoid. Width defaults to the reranker's ``compress_layers``/``compress_ratio``;
        ``compress_layer`` is FlagEmbedding's name for ``compress_layers``.
        """
        pairs, single = as_pair_list(pairs)
        if compress_layer is not None:
            if compress_layers is not None:
                raise ValueError("give compress_layers or its alias compress_layer, not both")
            compress_layers = compress_layer
        ratio = self.compress_ratio if compress_ratio is None else compress_ratio
        layers_c = self.compress_layers if compress_layers is None else tuple(compress_layers)
        layers = self.model.check_cutoff_layers(cutoff_layers)
        _check_width(self.model.check_compression(layers_c, ratio), ratio)
        encoded = self.encoder.encode_many(pairs)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))  # length buckets
        scores = torch.empty(len(layers), len(encoded))
        size = batch_size or self.batch_size
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            batch = {k: v.to(self.device) for k, v in self.encoder.collate([encoded[i] for i in rows]).items()}
            if self.packed is not None and not self.model.check_compression(layers_c, ratio):
                outputs = self.packed(batch["input_ids"], batch["attention_mask"], layers)
            else:
                outputs = self.model(**batch, cutoff_layers=layers, compress_layers=layers_c, compress_ratio=ratio)
            for j, layer_scores in enumerate(outputs):
                scores[j, rows] = layer_scores.float().cpu()
        if normalize:
            scores = torch.sigmoid(scores)
        result = scores.tolist()
        if single:
            result = [row[0] for row in result]
        return result[0] if _one_layer(cutoff_layers) else result

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int | None = None,
        cutoff_layer: int | None = None,
        compress_layers: Sequence[int] | None = None,
        compress_ratio: int | None = None,
        normalize: bool = False,
        first_stage_scores: Sequence[float] | None = None,
        first_stage_weight: float = 0.5,
    ) -> list[dict]:
        """Documents ranked for one query, best first, as sentence-transformers' ``CrossEncoder.rank``:
        ``[{"corpus_id": index in documents, "score": float(, "text": document)}]``. With
        ``first_stage_scores`` (e.g. BM25's, one per document) ranks by their fusion with ours
        (``serving.ranking.fuse_scores``)."""
        def score(pairs):
            return self.compute_score(pairs, cutoff_layers=cutoff_layer, compress_layers=compress_layers,
                                      compress_ratio=compress_ratio, batch_size=batch_size)

        return rank_documents(score, query, documents, top_k, return_documents, first_stage_scores, first_stage_weight,
                              (lambda raw: torch.sigmoid(torch.tensor(raw)).tolist()) if normalize else None)


def _one_layer(cutoff_layers) -> bool:
    return cutoff_layers is None or isinstance(cutoff_layers, int) or len(cutoff_layers) == 1


def _check_width(layers: tuple[int, ...], ratio: int) -> None:
    """A ratio above 1 merges tokens only at compression layers: asked without any, it silently scored uncompressed
    (training draws such steps on purpose; a caller asking for a ratio means it)."""
    if ratio > 1 and not layers:
        raise ValueError(f"compress_ratio={ratio} needs compress_layers (where to merge, e.g. [8]); "
                         "without them nothing is compressed")
