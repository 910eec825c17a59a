"""Training losses over the exit layers of one batch of groups.

A batch holds B groups of G passages, the positive at index 0. The model scores every group at
every exit layer twice: the *student* pass (compressed when this step samples compression) and
the *full* pass (same weights, full width; it equals the student pass when nothing is
compressed). Scores come as lists, deepest exit last; below, layers are counted from the deepest
(``i = 0`` is the deepest exit, ``i = 1`` the next shallower one, ...), as upstream does.

``train_method`` is a string of substring flags, matched as in upstream FlagEmbedding's
Matryoshka re-ranker (so ``distill_fix_layer_teacher`` means distill + fix_layer + teacher):

* every method: listwise cross-entropy at every exit, the positive being class 0.
* ``normal``: only that (any string without the flags below behaves the same way).
* ``teacher``: every exit also learns the external teacher's distribution
  ``softmax(teacher_scores / T)`` by soft cross-entropy.
* ``distill`` (without ``teacher``): only the deepest exit learns the external teacher; the
  shallower ones learn from the model itself (flags below).
* self-distillation targets for the shallower exits ``i >= 1`` (first flag present wins, in this
  order, as upstream's ``if/elif`` chain; the deepest exit never has a self target):
  ``final_layer``: the full-width deepest exit ``f_0``; ``last_layer``: the next deeper full-width
  exit ``f_{i-1}`` (a cascade); ``fix_layer``: the teacher is refreshed every ``k`` exits, so exit
  ``i`` learns ``f_{k * floor((i - 1) / k)}`` (``k = fix_layer_every``, upstream hard-codes 8).
* ``same_layer`` (ours, checked before the three above): *every* exit, the deepest too, learns
  the same exit of the *reference* pass ``r_i``: full width, with the adapter being trained
  switched off, i.e. the weights this adapter is stacked on. It is the objective of a token
  (width) compensation adapter: a compressed input should score as the uncompressed model it
  compensates for, exit by exit (``full`` then holds the reference scores; the training model
  computes them). Meaningless for self-distillation from a raw LM (the reference would be the
  untrained model), so the config refuses it there.
* ``mse`` (ours): the self-distillation target above is matched by the mean squared error of the
  raw scores, ``mean_j (s_j - f_j)^2``, instead of soft cross-entropy. Why: on training queries
  the self-distilled model is near certain (exit 16's listwise loss ~1e-3 on SciFact train), so
  soft targets are almost one-hot and a token adapter learns next to nothing from them, while the
  scores a compressed input gets still differ from the uncompressed ones; matching the scores
  themselves keeps that signal. Only with ``same_layer`` (the same head, so the same scale; the config
  refuses it otherwise); ``temperature`` does not apply to it.

Every target is detached: teachers are never trained through their targets.

Deviations from upstream, on purpose: upstream enables the self-distillation flags only together
with ``distill`` and silently drops ``final_layer`` when ``teacher`` is also present (its target
is only set in a branch ``teacher`` skips); here each flag always does what it says. Upstream
has no temperature (``T = 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SELF_TARGETS = ("same_layer", "final_layer", "last_layer", "fix_layer")


@dataclass(frozen=True)
class TrainMethod:
    """The flags of a ``train_method`` string (see the module docstring)."""

    name: str
    fix_layer_every: int = 8
    temperature: float = 1.0

    def __post_init__(self):
        if self.fix_layer_every < 1:
            raise ValueError(f"fix_layer_every must be >= 1, got {self.fix_layer_every}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def teacher_every_layer(self) -> bool:
        return "teacher" in self.name

    @property
    def teacher_deepest_only(self) -> bool:
        return "distill" in self.name and not self.teacher_every_layer

    @property
    def needs_teacher_scores(self) -> bool:
        return self.teacher_every_layer or self.teacher_deepest_only

    @property
    def self_target(self) -> str | None:
        return next((flag for flag in SELF_TARGETS if flag in self.name), None)

    @property
    def score_mse(self) -> bool:
        """Self targets matched by squared error of the raw scores (not soft cross-entropy)."""
        return "mse" in self.name

    @property
    def needs_full_width(self) -> bool:
        return self.self_target is not None

    @property
    def needs_reference(self) -> bool:
        """The full-width targets come from the model with the trained adapter switched off."""
        return self.self_target == "same_layer"

    def self_target_index(self, i: int) -> int | None:
        """Which full-width exit (counted from the deepest) teaches exit ``i``; None for none."""
        if self.self_target == "same_layer":
            return i
        if i == 0 or self.self_target is None:
            return None
        if self.self_target == "final_layer":
            return 0
        if self.self_target == "last_layer":
            return i - 1
        k = self.fix_layer_every
        return k * ((i - 1) // k)


def listwise_ce(scores: torch.Tensor) -> torch.Tensor:
    """(B, G) scores, positive at column 0 -> mean cross-entropy."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), target)


def soft_ce(scores: torch.Tensor, target_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over groups of ``-sum_j softmax(target / T)_j * log_softmax(scores)_j``; target detached."""
    target = torch.softmax(target_scores.detach().float() / temperature, dim=-1)  # (B, G)
    return -(target * torch.log_softmax(scores.float(), dim=-1)).sum(-1).mean()


def matryoshka_loss(
    student: Sequence[torch.Tensor],
    method: TrainMethod,
    full: Sequence[torch.Tensor] | None = None,
    teacher_scores: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total loss and the loss of each exit layer.

    student, full: per exit layer (deepest last) scores (B, G); ``full`` defaults to ``student``
    (no compression this step; with ``same_layer`` it must be the reference pass's scores).
    teacher_scores: (B, G), needed when the method uses the external teacher. Returns ``(loss, per_layer)`` with per_layer (L,) in the same order as ``student``
    (detached) and loss = sum(weights * per_layer) (with gradient; weights default to 1 per exit,
    in ``student``'s order: a larger weight on shallow exits makes the shared early layers serve them).
    """
    if not student:
        raise ValueError("no exit layer scores")
    if weights is not None and (len(weights) != len(student) or any(w < 0 for w in weights)):
        raise ValueError(f"need one weight >= 0 per exit ({len(student)}), got {list(weights)}")
    if full is None and method.needs_reference:
        raise ValueError(f"train_method {method.name!r} needs the reference pass's scores (full=...)")
    full = student if full is None else full
    if len(full) != len(student):
        raise ValueError(f"{len(student)} student exits but {len(full)} full-width exits")
    if method.needs_teacher_scores:
        if teacher_scores is None:
            raise ValueError(f"train_method {method.name!r} needs teacher scores (run teacher scoring first)")
        if teacher_scores.shape != student[0].shape:
            raise ValueError(f"teacher_scores {tuple(teacher_scores.shape)} != scores {tuple(student[0].shape)}")
    deepest_first_student, deepest_first_full = list(student)[::-1], list(full)[::-1]
    T = method.temperature
    per_layer = []
    for i, scores in enumerate(deepest_first_student):  # scores (B, G)
        loss = listwise_ce(scores)
        if method.teacher_every_layer or (method.teacher_deepest_only and i == 0):
            loss = loss + soft_ce(scores, teacher_scores, T)
        j = method.self_target_index(i)
        if j is not None and method.score_mse:
            loss = loss + F.mse_loss(scores.float(), deepest_first_full[j].detach().float())
        elif j is not None:
            loss = loss + soft_ce(scores, deepest_first_full[j], T)
        per_layer.append(loss)
    per_layer = torch.stack(per_layer[::-1])  # (L,) deepest last again
    if weights is None:
        return per_layer.sum(), per_layer.detach()
    return (per_layer * per_layer.new_tensor(list(weights))).sum(), per_layer.detach()
