"""LoRA adapters (PEFT) on a Matryoshka model: how they are configured, attached and merged."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from peft import LoraConfig, PeftModel

from ..core.atomic import sha256_file
from ..core.errors import InputError
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


class AdapterStackError(InputError):
    """Adapters that were not trained on top of each other, asked to be merged as a stack."""


TRAINING_LOG = "training_log.json"  # written beside each trained adapter; ``trained_on`` is read here


def adapter_digest(path: str | Path) -> str:
    """sha256 of an adapter's weights file (``adapter_model.safetensors``, or PEFT's older ``.bin``): what an
    adapter trained on top of it records."""
    path = Path(path)
    weights = next((f for f in (path / "adapter_model.safetensors", path / "adapter_model.bin") if f.exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{path} has no adapter weights (adapter_model.safetensors or .bin)")
    return sha256_file(weights)


def _recorded(path: str | Path, key: str):
    """``key`` of the training log beside adapter ``path``, None where there is no readable log."""
    try:
        log = json.loads((Path(path) / TRAINING_LOG).read_text())
    except (OSError, ValueError):
        return None
    return log.get(key) if isinstance(log, dict) else None


def trained_on(path: str | Path) -> list[str] | None:
    """The digests of the adapters ``path`` was trained on top of (its training log), None where unrecorded."""
    recorded = _recorded(path, "trained_on")
    return recorded if isinstance(recorded, list) else None


def trained_exits(path: str | Path) -> list[int] | None:
    """The exit layers ``path`` was trained with (its training log), None where unrecorded."""
    recorded = _recorded(path, "exit_layers")
    return recorded if isinstance(recorded, list) and recorded and all(isinstance(k, int) for k in recorded) else None


def trained_layout(path: str | Path) -> tuple[int, int] | None:
    """(start_layer, layer_sep) of the model ``path`` was trained on, from its recorded exits."""
    exits = trained_exits(path)
    if exits is None:
        return None
    return exits[0], (exits[1] - exits[0] if len(exits) > 1 else 1)


def trained_compression(path: str | Path) -> tuple[tuple[int, ...], int] | None:
    """(compress_layers, ratio) of an adapter trained at one fixed width (a token adapter, ``compensation``), from
    its training log: the width it scores as by default. None for one trained uncompressed (the layer adapter), at
    sampled widths (self-distillation: every width), or without a record (adapters trained before 2026-12-07)."""
    plan = _recorded(path, "compression")
    if not isinstance(plan, dict) or plan.get("sample") is not False:
        return None
    ratios, layers = plan.get("ratios"), plan.get("layers")
    if not isinstance(ratios, list) or len(ratios) != 1 or not isinstance(layers, list) or not layers:
        return None
    return (tuple(int(c) for c in layers), int(ratios[0])) if int(ratios[0]) > 1 else None


def stack_compression(adapter_paths: Sequence[str | Path]) -> tuple[tuple[int, ...], int] | None:
    """The width a stack scores at by default: that of its top token adapter (``trained_compression``), or None."""
    return next((w for w in map(trained_compression, reversed(list(adapter_paths))) if w), None)


def check_stack(adapter_paths: Sequence[str | Path]) -> None:
    """Each adapter that records what it was trained on top of (``trained_on`` in its training log: the
    digests of the adapters below it) must sit on exactly those files. A stack mixing a new layer adapter
    with a token adapter trained on the old one (a compensation run that stopped half way, or
    ``compensate --only layer``) would merge an adapter onto weights it never saw, silently. Adapters
    without a record (older ones, snapshots, other tools' adapters) are not checked."""
    paths = [Path(p) for p in adapter_paths]
    for i, path in enumerate(paths):
        recorded = trained_on(path)
        if recorded is not None and recorded != [adapter_digest(p) for p in paths[:i]]:
            raise AdapterStackError(f"{path} was trained on top of other adapter files than "
                                    f"{[str(p) for p in paths[:i]] or 'the base model'}: merging it there gives "
                                    "a model nobody trained; train it again (`matryoshka compensate`, or `dvc repro`)")


def merge_adapters(model: MatryoshkaModel, adapter_paths: Sequence[str | Path],
                   merged: Sequence[str | Path] = ()) -> MatryoshkaModel:
    """Applies saved adapters in order, merging each into the weights before the next.

    The order matters and mirrors training: self-distillation, then the vertical (layer) adapter,
    then a horizontal (token) adapter; each must have been trained on the ones before it (``check_stack``),
    ``merged`` (those already merged into ``model``, e.g. the export's shared prefix) included.
    """
    for path in adapter_paths:
        if not (Path(path) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path} is not a LoRA adapter folder (no adapter_config.json)")
    check_stack([*merged, *adapter_paths])
    for path in adapter_paths:
        exits = trained_exits(path)
        if exits is not None and exits != list(model.exit_layers):
            start, sep = trained_layout(path)
            raise ValueError(f"{path} was trained with score heads at exits {exits} (start_layer={start}, "
                             f"layer_sep={sep}); this model has them at {model.exit_layers}: load it with "
                             f"start_layer={start}, layer_sep={sep}, or the heads of the missing exits are dropped")
    for path in adapter_paths:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return model
