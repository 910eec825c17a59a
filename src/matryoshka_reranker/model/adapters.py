"""LoRA adapters (PEFT) on a Matryoshka model: how they are configured, attached and merged."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from peft import LoraConfig, PeftModel

from .modeling import MatryoshkaModel

if TYPE_CHECKING:  # the model layer reads params but does not depend on the config module
    from ..config import LoraParams


def target_pattern(names: Sequence[str]) -> str:
    """A PEFT target regex: each name is a module's leaf name or a container of Linears.

    ``score_heads`` is a ModuleDict keyed by exit layer, so it matches ``score_heads.<k>``.
    """
    alternatives = [re.escape(n) + (r"\.\d+" if n == "score_heads" else "") for n in names]
    return rf"(.*\.)?({'|'.join(alternatives)})"


def lora_config(params: LoraParams, exit_layers: Sequence[int] = ()) -> LoraConfig:
    """PEFT config. ``params.heads == "full"``: the score heads train as full weights (PEFT
    ``modules_to_save``: a (1 x hidden) head is already rank 1, so a LoRA product on it only slows
    learning), saved inside the adapter and swapped in by ``merge_and_unload``."""
    targets = list(params.target_modules)
    full = params.heads == "full" and exit_layers
    if full:
        targets = [t for t in targets if t != "score_heads"]
    ranks, alphas = layer_rank_patterns(params, [t for t in targets if t != "score_heads"])
    return LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=target_pattern(targets),
        modules_to_save=[f"score_heads.{k}" for k in exit_layers] if full else None,
        bias="none",
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )


def layer_rank_patterns(params: LoraParams, targets: Sequence[str]) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` for ``params.layer_ranks`` ({k: r}: layers 1..k at rank r).

    Keys match a projection inside decoder layer i (0-based in module names, 1-based here); alpha
    scales with the rank so that every layer's LoRA keeps the same ``alpha / rank`` step size.
    """
    ranks, alphas = {}, {}
    if not params.layer_ranks or not targets:
        return ranks, alphas
    names = "|".join(re.escape(t) for t in targets)
    below, covered = 0, sorted(params.layer_ranks)
    for k in covered:
        layers = "|".join(str(i) for i in range(below, k))  # module index i = layer i + 1
        if layers:
            key = rf"layers\.(?:{layers})\.(?:\w+\.)+(?:{names})"  # any nesting (mlp.experts.0.up_proj)
            ranks[key] = params.layer_ranks[k]
            alphas[key] = params.alpha * params.layer_ranks[k] / params.rank
        below = k
    return ranks, alphas


def merge_adapters(model: MatryoshkaModel, adapter_paths: Sequence[str | Path]) -> MatryoshkaModel:
    """Applies saved adapters in order, merging each into the weights before the next.

    The order matters and mirrors training: self-distillation, then the vertical (layer) adapter,
    then a horizontal (token) adapter.
    """
    for path in adapter_paths:
        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path} is not a LoRA adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return model
