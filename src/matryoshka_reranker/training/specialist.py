"""Exit specialists: the ratio-1 model cut after exit k, trained for exit k alone on its deepest exit's scores.

Why: the shared-weight model's shallow exits stay under full depth whatever the recipe (on SciFact exit 8
sat 0.04-0.08 nDCG@10 below exit 30, and an exit-8 adapter on the shared weights bought +0.013), while the
same weights cut after layer 8 and distilled from exit 30 for 1,600 steps came within 0.05 of full depth at
95% in two seeds (-0.008 [-0.026, +0.011] and -0.010 [-0.031, +0.011]; docs/quality.md, "Exit 8's gap"). Cutting is what makes that affordable: a step runs k layers,
and the teacher (the deepest exit) is computed once, not at every step. The price: a specialist has its own
weights for layers 1..k, so it ships as its own model (``exit-KK-ratio-1-specialist``) beside the shared
ones, which stay as they are.

For the exits in ``specialist.exits`` (the stage writes an empty ``specialists.json`` when there are none):

1. Teacher: the pipeline's ratio-1 model (``Params.adapter_stack(1)``) scores every training group (the
   positive and the first ``train_group_size - 1`` negatives of each query, the hardest BM25 ones) at its
   deepest exit, once, in ``model.dtype`` (auto: bf16 on CUDA and AMX CPUs), for every k alike; under
   several workers each scores its share of the groups on its own device and all read the merged scores.
2. Cut: base + that stack merged, cut after layer k (``MatryoshkaModel.truncate``); the exit-k scores of a
   few pairs are checked to be unchanged by the cut.
3. Train: a fresh LoRA with the ``specialist.*`` training settings (default ``teacher``: listwise CE + soft
   CE to the deepest exit's scores), the loss at exit k alone, no compression. The adapter lands in
   ``paths.specialists/exit-KK``, recording the stack's digests as what it was trained on, so the export,
   which merges the same stack, cuts, and merges the specialist, refuses any other stack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..config import Params
from ..core.atomic import atomic_dir, write_json
from ..core.distributed import rank_and_world
from ..core.errors import CheckFailed
from ..model.adapters import adapter_digest, merge_adapters
from .data import TrainingExample, load_training_file
from .trainer import (AdapterRun, CompressionPlan, base_fingerprint, load_base, pair_encoder, remove_stale_adapters,
                      sha256_file, train_adapter)

log = logging.getLogger(__name__)

INDEX = "specialists.json"
CUT_TOLERANCE = 1e-4  # exit-k scores before and after the cut (the same modules, so ~0)


class SpecialistError(CheckFailed):
    """A specialist could not be built as asked (its cut changed the exit's scores, a stack is missing)."""


def specialize(params: Params, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """The stage: one adapter per ``specialist.exits`` under ``paths.specialists``; returns {k: training log}."""
    spec, out = params.specialist, Path(params.paths.specialists)
    rank, _ = rank_and_world()
    if not spec.exits:
        if rank == 0:
            with atomic_dir(out) as tmp:
                write_json(tmp / INDEX, {"exits": []})
        return {}
    stack = params.adapter_stack(1)
    missing = [str(p) for p in stack if not (p / "adapter_config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"specialists are cut from the ratio-1 model; its adapters are missing: "
                                f"{', '.join(missing)} (run self_distill and compensate)")
    started = time.perf_counter()
    examples, deepest = teacher_examples(params, load_training_file(params.paths.teacher_scored,
                                                                    prompt=params.model.prompt))
    teacher_seconds = round(time.perf_counter() - started, 1)
    digests = [adapter_digest(p) for p in stack]  # before merging: what every specialist is trained on
    scores_sha256 = hashlib.sha256(json.dumps([(e.pos_scores, e.neg_scores) for e in examples]).encode()).hexdigest()
    results = {}
    for k in sorted(set(spec.exits)):
        model, tokenizer, path = load_base(params)
        encoder = pair_encoder(params, tokenizer)
        model, drift = cut_stack(merge_adapters(model, stack), k, encoder, examples[:2])
        train = spec.model_copy(update={"layer_weights": {j: float(j == k) for j in model.exit_layers}})
        fingerprint = {**base_fingerprint(params, path, Path(params.paths.teacher_scored)),
                       "train": train.model_dump(exclude={"exits"}),  # adding an exit keeps the others' checkpoints
                       "exit": k, "stack_sha256": digests, "teacher_scores_sha256": scores_sha256,
                       "deepspeed_sha256": sha256_file(train.deepspeed) if train.deepspeed else None}
        log.info("specialist exit %d: %d layers of %s + %s, %d groups", k, k, params.model.name_or_path,
                 [str(p) for p in stack], len(examples))
        summary = train_adapter(AdapterRun(
            stage=f"specialist_exit_{k}", model=model, tokenizer=tokenizer, encoder=encoder, examples=examples,
            train=train, plan=CompressionPlan(), output_dir=params.specialist_dir(k),
            checkpoint_dir=Path(params.paths.checkpoints) / f"specialist-{k:02d}", fingerprint=fingerprint,
            base_name=f"{params.model.name_or_path} (+ ratio-1 stack, layers 1-{k})", callbacks=list(callbacks),
            trained_on=digests,
        ))
        results[k] = {**summary, "cut_max_abs_diff": drift}
        del model
    if rank == 0:
        remove_stale_adapters(out, "exit-*", {params.specialist_dir(k).name for k in spec.exits})
        write_json(out / INDEX, {
            "exits": sorted(set(spec.exits)), "stack": [str(p) for p in stack], "stack_sha256": digests,
            "groups": len(examples), "group_size": spec.train_group_size, "teacher_scores_sha256": scores_sha256,
            "teacher_exit": deepest, "teacher_seconds": teacher_seconds,
            "adapters": {f"exit-{k:02d}": {"steps": r["steps"], "wall_seconds": r["wall_seconds"],
                                           "cut_max_abs_diff": r["cut_max_abs_diff"]} for k, r in results.items()},
        })
    return results


def teacher_examples(params: Params, examples: list[TrainingExample]) -> tuple[list[TrainingExample], int]:
    """(groups, teacher exit): each query's positive + first ``train_group_size - 1`` negatives, scored at the ratio-1 model's deepest
    exit (the file's own teacher scores are not used: the specialist learns this model's full depth)."""
    from ..serving.reranker import MatryoshkaReranker

    negatives = params.specialist.train_group_size - 1
    groups = [dataclasses.replace(e, pos=e.pos[:1], neg=e.neg[:negatives], pos_scores=None, neg_scores=None)
              for e in examples]
    rank, world = rank_and_world()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else None
    teacher = MatryoshkaReranker.from_pipeline(params, ratio=1, device=device)
    deepest = teacher.exit_layers[-1]
    too_deep = sorted(k for k in params.specialist.exits if k not in teacher.exit_layers[:-1])
    if too_deep:  # before the teacher pass, not minutes later at the cut
        raise ValueError(f"specialist.exits {too_deep}: a specialist needs an exit below the deepest "
                         f"({deepest}), which teaches it (exits {teacher.exit_layers})")
    mine = [i for i in range(len(groups)) if i % world == rank]
    pairs = [(groups[i].query, p) for i in mine for p in groups[i].pos + groups[i].neg]
    flat = teacher.compute_score(pairs, cutoff_layers=[deepest]) if pairs else []
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if world > 1:
        flat = _gather_scores(params, groups, mine, flat, rank, world)
    scored, at = [], 0
    for g in groups:
        scored.append(dataclasses.replace(g, pos_scores=flat[at:at + 1], neg_scores=flat[at + 1:at + 1 + len(g.neg)]))
        at += 1 + len(g.neg)
    log.info("specialist teacher: %d pairs scored at exit %d", len(pairs), deepest)
    return scored, deepest


def _gather_scores(params: Params, groups: list, mine: list[int], flat: list[float], rank: int, world: int
                   ) -> list[float]:
    """Every worker's share (written beside the checkpoints), merged in group order after a barrier."""
    from ..core.distributed import barrier

    folder = Path(params.paths.checkpoints) / "specialist-teacher"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [1 + len(groups[i].neg) for i in mine]
    shares, at = {}, 0
    for i, n in zip(mine, sizes):
        shares[i] = flat[at:at + n]
        at += n
    write_json(folder / f"rank-{rank}.json", {str(i): v for i, v in shares.items()})
    barrier()
    merged: dict[int, list[float]] = {}
    for r in range(world):
        merged.update({int(i): v for i, v in json.loads((folder / f"rank-{r}.json").read_text()).items()})
    barrier()  # every worker has read every share before any later run may overwrite them
    return [s for i in range(len(groups)) for s in merged[i]]


def cut_stack(model, k: int, encoder, examples: Sequence[TrainingExample]):
    """``model`` cut after layer k, and the largest change the cut made to exit k's scores (must be ~0)."""
    pairs = [(e.query, p) for e in examples for p in e.pos + e.neg]
    batch = encoder.collate(encoder.encode_many(pairs))
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = model.eval()(**inputs, cutoff_layers=[k])[0]
        cut = model.truncate(k)
        after = cut(**inputs, cutoff_layers=[k])[0]
    drift = float((before - after).abs().max())
    if drift > CUT_TOLERANCE:
        raise SpecialistError(f"cutting after layer {k} changed exit {k}'s scores by {drift:.2e} "
                              f"(> {CUT_TOLERANCE}); the cut model would not be the one trained")
    return cut, drift

