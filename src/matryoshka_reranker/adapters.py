"""LoRA adapters (PEFT) on a Matryoshka model: how they are configured, attached and merged."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from peft import LoraConfig, PeftModel

from .config import LoraParams
from .modeling import MatryoshkaModel


def target_pattern(names: Sequence[str]) -> str:
    """A PEFT target regex: each name is a module's leaf name or a container of Linears.

    ``score_heads`` is a ModuleDict keyed by exit layer, so it matches ``score_heads.<k>``.
    """
    alternatives = [re.escape(n) + (r"\.\d+" if n == "score_heads" else "") for n in names]
    return rf"(.*\.)?({'|'.join(alternatives)})"


def lora_config(params: LoraParams) -> LoraConfig:
    return LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=target_pattern(params.target_modules),
        bias="none",
    )


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
