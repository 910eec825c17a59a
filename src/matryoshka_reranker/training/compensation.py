"""Factorized compensation: a vertical (layer) adapter and one horizontal (token) adapter per ratio.

Each adapter is trained on top of exactly the weights it will be merged onto at inference, where
``Params.adapter_stack(ratio)`` merges [self_distill, layer, token-ratio-r] in that order:

* ``layer``: base + self-distillation adapter merged; compression off, every exit trained, so it
  compensates what early exits lose (width is full). Saved to ``paths.compensation/layer``.
* ``token-ratio-<r>``: base + self-distillation + layer adapters merged; compression always on
  at every ``compression.layers`` with ratio r, so it compensates what merging passage tokens
  loses at that width. Saved to ``paths.compensation/token-ratio-<r>``. Ratio 1 needs none.

Both use ``compensation.layer`` / ``compensation.token`` training parameters (method, steps, LoRA)
and the same step as self-distillation (``training.MatryoshkaTrainingModel``): with a
``*_layer`` method the full-width exits of the same weights are the (detached) teachers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from ..config import TOKEN_ADAPTER_PREFIX, Params
from ..model.adapters import adapter_digest, merge_adapters
from ..model.losses import TrainMethod
from .data import load_training_file
from .trainer import (
    AdapterRun,
    CompressionPlan,
    base_fingerprint,
    load_base,
    pair_encoder,
    remove_stale_adapters,
    sha256_file,
    train_adapter,
)

log = logging.getLogger(__name__)


def _check_adapter(path: Path, what: str) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{what} adapter {path} is missing ({name}); run the stage that makes it")


def compensate(params: Params, callbacks: Sequence[TrainerCallback] = (), only: Sequence[str] | None = None) -> dict:
    """Trains the layer adapter, then one token adapter per ``compensation.token_ratios``.

    ``only`` restricts the run to some of "layer", "token-ratio-<r>" (the others must exist).
    Returns {adapter name: training log}.
    """
    comp, paths = params.compensation, params.paths
    self_distill, layer_dir = Path(paths.self_distill), params.layer_adapter_dir()
    _check_adapter(self_distill, "self-distillation")
    data_file = Path(paths.teacher_scored)
    jobs = [("layer", comp.layer, [self_distill], CompressionPlan(), layer_dir)]
    for ratio in comp.token_ratios:
        plan = CompressionPlan(tuple(params.compression.layers), (ratio,), sample=False)
        token_dir = params.token_adapter_dir(ratio)
        jobs.append((token_dir.name, comp.token, [self_distill, layer_dir], plan, token_dir))
    wanted = set(only) if only else {name for name, *_ in jobs}
    unknown = wanted - {name for name, *_ in jobs}
    if unknown:
        raise ValueError(f"unknown compensation adapter(s) {sorted(unknown)}")
    if any(name.startswith(TOKEN_ADAPTER_PREFIX) for name in wanted) and not params.compression.layers:
        raise ValueError("token adapters need compression.layers (where to compress)")

    needs_scores = any(TrainMethod(train.train_method).needs_teacher_scores for _, train, *_ in jobs)
    examples = load_training_file(data_file, require_scores=needs_scores, prompt=params.model.prompt)
    results = {}
    for name, train, stack, plan, output_dir in jobs:
        if name not in wanted:
            continue
        for adapter in stack:
            _check_adapter(adapter, adapter.name)
        digests = [adapter_digest(a) for a in stack]  # before merging: what this adapter is trained on
        model, tokenizer, path = load_base(params)
        model = merge_adapters(model, stack)
        fingerprint = {**base_fingerprint(params, path, data_file), "train": train.model_dump(),
                       "plan": [list(plan.layers), list(plan.ratios), plan.sample],
                       "stack_sha256": digests,
                       "deepspeed_sha256": sha256_file(train.deepspeed) if train.deepspeed else None}
        log.info("compensation %s: training on top of %s", name, [str(a) for a in stack])
        results[name] = train_adapter(AdapterRun(
            stage=f"compensation_{name}", model=model, tokenizer=tokenizer, encoder=pair_encoder(params, tokenizer),
            examples=examples, train=train, plan=plan, output_dir=output_dir,
            checkpoint_dir=Path(paths.checkpoints) / f"compensation_{name}", fingerprint=fingerprint,
            base_name=params.model.name_or_path, callbacks=list(callbacks), trained_on=digests,
        ))
        del model
    remove_stale_adapters(Path(paths.compensation), f"{TOKEN_ADAPTER_PREFIX}*",
                          {params.token_adapter_dir(r).name for r in comp.token_ratios})
    return results
