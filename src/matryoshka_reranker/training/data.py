"""Training data: FlagEmbedding-format JSONL, the group dataset, and the collator.

One line per query: ``{"query": str, "pos": [str, ...], "neg": [str, ...]}``, optionally
``pos_scores`` / ``neg_scores`` (floats aligned with ``pos`` / ``neg``), ``prompt`` and the ids
``query_id`` / ``pos_ids`` / ``neg_ids``; other keys (e.g. ``teacher``) are kept and ignored.
A group is one positive and ``train_group_size - 1`` negatives, the positive first.

A per-line ``prompt`` must equal the pipeline's ``model.prompt``: a model is served with the one
prompt saved in its input format, so lines trained under another prompt would teach it a format
it never sees at serving time. Such lines are refused with their line number.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.jsonl import read_jsonl
from ..model.inputs import PairEncoder

log = logging.getLogger(__name__)


class TrainingDataError(InputError):
    """A training file is malformed; the message names ``file:line``."""


@dataclass(frozen=True)
class TrainingExample:
    query: str
    pos: list[str]
    neg: list[str]
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None
    prompt: str | None = None

    @property
    def has_scores(self) -> bool:
        return self.pos_scores is not None and self.neg_scores is not None


def _check_strings(where: str, obj: dict, key: str) -> list[str]:
    value = obj.get(key)
    if value is None:
        raise TrainingDataError(f"{where}: missing field {key!r}")
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise TrainingDataError(f"{where}: {key!r} must be a list of strings")
    if not value:
        raise TrainingDataError(f"{where}: {key!r} is empty (need at least one passage)")
    return value


def _check_scores(where: str, obj: dict, key: str, passages: list[str], passages_key: str) -> list[float] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise TrainingDataError(f"{where}: {key!r} must be a list of numbers")
    if len(value) != len(passages):
        raise TrainingDataError(
            f"{where}: {key!r} has {len(value)} scores but {passages_key!r} has {len(passages)} passages"
        )
    if not all(math.isfinite(x) for x in value):
        raise TrainingDataError(f"{where}: {key!r} contains a non-finite score (NaN or inf)")
    return [float(x) for x in value]


def parse_example(obj: object, where: str) -> TrainingExample:
    """Validates one decoded line; ``where`` ("file:line") prefixes every error."""
    if not isinstance(obj, dict):
        raise TrainingDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "query" not in obj:
        raise TrainingDataError(f"{where}: missing field 'query'")
    if not isinstance(obj["query"], str) or not obj["query"].strip():
        raise TrainingDataError(f"{where}: 'query' must be a non-empty string")
    pos, neg = _check_strings(where, obj, "pos"), _check_strings(where, obj, "neg")
    pos_scores = _check_scores(where, obj, "pos_scores", pos, "pos")
    neg_scores = _check_scores(where, obj, "neg_scores", neg, "neg")
    if (pos_scores is None) != (neg_scores is None):
        raise TrainingDataError(f"{where}: give both 'pos_scores' and 'neg_scores' or neither")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise TrainingDataError(f"{where}: 'prompt' must be a string")
    for key, passages in (("pos_ids", pos), ("neg_ids", neg)):
        ids = obj.get(key)
        if ids is not None and (not isinstance(ids, list) or len(ids) != len(passages)):
            raise TrainingDataError(f"{where}: {key!r} must be a list aligned with {key[:3]!r}")
    return TrainingExample(obj["query"], pos, neg, pos_scores, neg_scores, prompt)


def load_training_file(path: str | Path, require_scores: bool = False, prompt: str | None = None
                       ) -> list[TrainingExample]:
    """Reads and validates a whole training file (it is small next to training time).

    ``prompt``: the input format's prompt; a line whose own ``prompt`` differs is refused.
    """
    examples = []
    for where, obj in read_jsonl(path, what="training file"):
        example = parse_example(obj, where)
        if prompt is not None and example.prompt is not None and example.prompt != prompt:
            raise TrainingDataError(
                f"{where}: per-line prompt {example.prompt!r} differs from model.prompt {prompt!r}; "
                "a model serves with one prompt, so set model.prompt or drop the line's prompt"
            )
        if require_scores and not example.has_scores:
            raise TrainingDataError(
                f"{where}: no 'pos_scores'/'neg_scores' but the train method distills from a teacher "
                "(run `matryoshka teacher-score` first)"
            )
        examples.append(example)
    if not examples:
        raise TrainingDataError(f"{path}: no training examples")
    return examples


@dataclass(frozen=True)
class Group:
    query: str
    passages: list[str]  # positive first
    teacher_scores: list[float] | None


class GroupDataset(torch.utils.data.Dataset):
    """Item i: a group sampled from example i, deterministic in (seed, epoch, i).

    Negatives are sampled without replacement when there are enough, with replacement otherwise.
    The HF Trainer (through accelerate) calls ``set_epoch`` so each epoch samples afresh.
    """

    def __init__(self, examples: Sequence[TrainingExample], group_size: int, seed: int = 42):
        if group_size < 2:
            raise ValueError(f"train_group_size must be >= 2, got {group_size}")
        self.examples, self.group_size, self.seed, self.epoch = list(examples), group_size, seed, 0
        short = sum(len(e.neg) < group_size - 1 for e in self.examples)
        if short:  # repeated negatives: the listwise loss sees the same passage twice in those groups
            log.warning("%d of %d training lines have fewer than train_group_size - 1 = %d negatives: theirs are "
                        "drawn with repetition (raise data.negatives_per_query, or lower train_group_size)",
                        short, len(self.examples), group_size - 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Group:
        example = self.examples[index]
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        p = rng.randrange(len(example.pos))
        wanted = self.group_size - 1
        if len(example.neg) >= wanted:
            negs = rng.sample(range(len(example.neg)), wanted)
        else:
            negs = [rng.randrange(len(example.neg)) for _ in range(wanted)]
        passages = [example.pos[p]] + [example.neg[n] for n in negs]
        scores = None
        if example.has_scores:
            scores = [example.pos_scores[p]] + [example.neg_scores[n] for n in negs]
        return Group(example.query, passages, scores)


class GroupCollator:
    """Groups -> model inputs: B*G rows (group-major, positive first), right padded.

    Returns input_ids, attention_mask (B*G, T), query_lengths, prompt_lengths (B*G,) and, when
    every group has them, teacher_scores (B, G) float32.
    """

    def __init__(self, encoder: PairEncoder):
        self.encoder = encoder

    def __call__(self, groups: Sequence[Group]) -> dict[str, torch.Tensor]:
        pairs = self.encoder.encode_many([(g.query, p) for g in groups for p in g.passages])
        batch = self.encoder.collate(pairs)
        if all(g.teacher_scores is not None for g in groups):
            batch["teacher_scores"] = torch.tensor([g.teacher_scores for g in groups], dtype=torch.float32)
        return batch
