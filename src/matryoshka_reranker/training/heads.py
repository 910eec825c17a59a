"""Score-head initialisation by a linear probe on frozen last-token states.

A raw causal LM's heads start as the LM head's "Yes" row: at deep exits that is the logit-lens
"Yes" logit, at shallow exits it is close to noise, and LoRA training moves a rank-r product of
small matrices from there slowly. The hidden states already separate relevant from irrelevant
passages (a probe on frozen features beats a 240-step LoRA run at exit 8 on SciFact), so before
training we fit every exit's head on frozen features:

1. one forward pass of the frozen model over ``probe_queries`` training groups gives the
   final-norm'd last-token state at *every* exit (the same states the heads read);
2. per exit, a listwise softmax regression (the training loss: cross-entropy on the positive,
   plus the teacher's distribution when the method uses it) with an L2 penalty, solved by L-BFGS
   on standardised features;
3. the head weight is the fitted direction divided by the feature scale. The mean shift is a
   constant per group, which a listwise loss (and any ranking) ignores, so the heads keep no bias.

A few minutes of forward passes give every exit a sensible start; LoRA then trains on top.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from ..model.inputs import PairEncoder
from ..model.modeling import MatryoshkaModel
from .data import GroupDataset, TrainingExample

log = logging.getLogger(__name__)


@torch.no_grad()
def last_token_states(model: MatryoshkaModel, encoder: PairEncoder, pairs: Sequence[tuple[str, str]],
                      batch_size: int = 16, bf16_autocast: bool = False) -> torch.Tensor:
    """(N, L, D) float32: every exit's final-norm'd last-token state for each pair (one pass), under
    bf16 autocast when training runs under it (the heads are then fitted on the states they will read)."""
    encoded = encoder.encode_many(pairs)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))  # less padding
    exits = model.exit_layers
    device = next(model.parameters()).device
    out = torch.empty(len(pairs), len(exits), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in encoder.collate([encoded[i] for i in rows]).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
            state = model.embed(batch["input_ids"], batch["attention_mask"])
            _, found = model.advance(state, exits[-1], set(exits), states=True, last_token_only=True)
        for j, k in enumerate(exits):
            out[rows, j] = found[k].float().cpu()
    return out


def fit_listwise(features: torch.Tensor, teacher: torch.Tensor | None, l2: float, temperature: float = 1.0,
                 max_iter: int = 100) -> torch.Tensor:
    """features (B, G, D), positive at column 0 -> head weight (D,) for ``score = features @ w``.

    Minimises listwise cross-entropy (+ soft cross-entropy to ``softmax(teacher / T)`` when given)
    + ``l2 * |w_std|^2`` in standardised coordinates.
    """
    flat = features.reshape(-1, features.shape[-1]).double()
    mean, scale = flat.mean(0), flat.std(0).clamp_min(1e-6)
    x = (features.double() - mean) / scale  # (B, G, D)
    target = torch.zeros(x.shape[0], dtype=torch.long)
    soft = None if teacher is None else torch.softmax(teacher.double() / temperature, dim=-1)
    w = torch.zeros(x.shape[-1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = x @ w  # (B, G)
        loss = torch.nn.functional.cross_entropy(logits, target)
        if soft is not None:
            loss = loss - (soft * torch.log_softmax(logits, -1)).sum(-1).mean()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (w.detach() / scale).float()


def probe_heads(model: MatryoshkaModel, encoder: PairEncoder, examples: Sequence[TrainingExample], queries: int,
                group_size: int, seed: int, l2: float, use_teacher: bool, temperature: float = 1.0,
                bf16_autocast: bool = False) -> dict:
    """Fits and sets every exit's head in place; returns a small log (queries, seconds, train accuracy)."""
    started = time.perf_counter()
    dataset = GroupDataset(list(examples)[:queries] if queries else list(examples), group_size, seed)
    groups = [dataset[i] for i in range(len(dataset))]
    pairs = [(g.query, p) for g in groups for p in g.passages]
    states = last_token_states(model, encoder, pairs, bf16_autocast=bf16_autocast).view(len(groups), group_size, len(model.exit_layers), -1)
    teacher = None
    if use_teacher and all(g.teacher_scores is not None for g in groups):
        teacher = torch.tensor([g.teacher_scores for g in groups], dtype=torch.float32)
    accuracy = {}
    with torch.no_grad():
        for j, k in enumerate(model.exit_layers):
            feats = states[:, :, j]  # (B, G, D)
            weight = fit_listwise(feats, teacher, l2, temperature)
            head = model.score_heads[str(k)]
            head.weight.copy_(weight.to(head.weight)[None])
            accuracy[k] = round(float(((feats @ weight).argmax(-1) == 0).float().mean()), 4)
    seconds = round(time.perf_counter() - started, 1)
    log.info("probe: heads fitted on %d groups x %d in %.0f s (train top-1 accuracy exit %d: %.2f, exit %d: %.2f)",
             len(groups), group_size, seconds, model.exit_layers[0], accuracy[model.exit_layers[0]],
             model.exit_layers[-1], accuracy[model.exit_layers[-1]])
    return {"groups": len(groups), "group_size": group_size, "seconds": seconds, "l2": l2,
            "teacher": teacher is not None, "train_top1": accuracy}
