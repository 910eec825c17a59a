"""Loss math of every train method against values written out by hand (groups of two passages).

With two passages, softmax is a sigmoid: for scores (a, b), p(pos) = 1 / (1 + e^(b - a)), so the
listwise cross-entropy is log(1 + e^(b - a)) and the soft cross-entropy against a target
distribution (q, 1 - q) is -(q log p + (1 - q) log(1 - p)).
"""

from __future__ import annotations

import math

import pytest
import torch

from matryoshka_reranker.model.losses import TrainMethod, matryoshka_loss


def ce(a, b):
    return math.log(1 + math.exp(b - a))


def p_pos(a, b):
    return 1 / (1 + math.exp(b - a))


def soft(student, target, temperature=1.0):
    p = p_pos(*student)
    q = p_pos(target[0] / temperature, target[1] / temperature)
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


# Exits listed shallowest first (deepest last), as the model returns them.
S = [(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (0.5, 1.5)]  # student (compressed) scores
F = [(0.0, 1.0), (0.0, 0.0), (3.0, 0.0), (1.0, -1.0)]  # full-width scores
T = (0.0, math.log(3.0))  # external teacher: softmax = (1/4, 3/4)


def run(method, n_exits=3, temperature=1.0, fix_every=8):
    student = [torch.tensor([s]) for s in S[:n_exits]]  # each (B=1, G=2)
    full = [torch.tensor([f]) for f in F[:n_exits]]
    loss, per_layer = matryoshka_loss(student, TrainMethod(method, fix_every, temperature), full, torch.tensor([T]))
    return loss.item(), per_layer.tolist()


def test_normal_is_cross_entropy_at_every_exit():
    loss, per_layer = run("normal")
    assert per_layer == pytest.approx([ce(*S[0]), ce(*S[1]), ce(*S[2])])
    assert loss == pytest.approx(sum(per_layer))


def test_distill_teaches_only_the_deepest_exit():
    _, per_layer = run("distill")
    assert per_layer == pytest.approx([ce(*S[0]), ce(*S[1]), ce(*S[2]) + soft(S[2], T)])


def test_teacher_teaches_every_exit():
    _, per_layer = run("teacher")
    assert per_layer == pytest.approx([ce(*s) + soft(s, T) for s in S[:3]])


def test_final_layer_full_width_deepest_teaches_all_shallower():
    _, per_layer = run("distill_final_layer")
    assert per_layer == pytest.approx([
        ce(*S[0]) + soft(S[0], F[2]),
        ce(*S[1]) + soft(S[1], F[2]),
        ce(*S[2]) + soft(S[2], T),
    ])


def test_last_layer_is_a_cascade_of_full_width_exits():
    _, per_layer = run("distill_last_layer")
    assert per_layer == pytest.approx([
        ce(*S[0]) + soft(S[0], F[1]),
        ce(*S[1]) + soft(S[1], F[2]),
        ce(*S[2]) + soft(S[2], T),
    ])


def test_fix_layer_refreshes_the_teacher_every_k_exits():
    # 4 exits, k = 2: counted from the deepest, exits 1 and 2 learn f_0 (deepest), exit 3 learns f_2.
    _, per_layer = run("distill_fix_layer", n_exits=4, fix_every=2)
    assert per_layer == pytest.approx([
        ce(*S[0]) + soft(S[0], F[1]),
        ce(*S[1]) + soft(S[1], F[3]),
        ce(*S[2]) + soft(S[2], F[3]),
        ce(*S[3]) + soft(S[3], T),
    ])
    # Upstream's k = 8 with 4 exits: everything learns the deepest full-width exit.
    assert run("distill_fix_layer", n_exits=4)[1] == pytest.approx(run("distill_final_layer", n_exits=4)[1])


def test_flags_combine_and_temperature_softens_targets():
    _, per_layer = run("distill_fix_layer_teacher", n_exits=4, fix_every=2, temperature=2.0)
    assert per_layer == pytest.approx([
        ce(*S[0]) + soft(S[0], T, 2.0) + soft(S[0], F[1], 2.0),
        ce(*S[1]) + soft(S[1], T, 2.0) + soft(S[1], F[3], 2.0),
        ce(*S[2]) + soft(S[2], T, 2.0) + soft(S[2], F[3], 2.0),
        ce(*S[3]) + soft(S[3], T, 2.0),
    ])


def test_same_layer_teaches_every_exit_its_own_reference_exit():
    # ``full`` holds the reference pass (the model without the adapter being trained).
    _, per_layer = run("same_layer")
    assert per_layer == pytest.approx([ce(*S[i]) + soft(S[i], F[i]) for i in range(3)])
    _, per_layer = run("distill_same_layer")  # the deepest exit learns the external teacher too
    assert per_layer[-1] == pytest.approx(ce(*S[2]) + soft(S[2], T) + soft(S[2], F[2]))
    with pytest.raises(ValueError, match="reference"):
        matryoshka_loss([torch.tensor([s]) for s in S[:3]], TrainMethod("same_layer"))


def test_mse_matches_the_self_targets_scores_not_their_distribution():
    _, per_layer = run("same_layer_mse")
    mse = [sum((a - b) ** 2 for a, b in zip(S[i], F[i])) / len(S[i]) for i in range(3)]
    assert per_layer == pytest.approx([ce(*S[i]) + mse[i] for i in range(3)])
    # every score one logit off, the ranking unchanged: soft cross-entropy cannot see it, squared error can
    shifted = [torch.tensor([[s + 1.0 for s in S[i]]]) for i in range(3)]
    reference = [torch.tensor([list(S[i])]) for i in range(3)]
    _, soft_only = matryoshka_loss(shifted, TrainMethod("same_layer"), reference)
    _, squared = matryoshka_loss(shifted, TrainMethod("same_layer_mse"), reference)
    assert soft_only.tolist() == pytest.approx([ce(*S[i]) + soft(S[i], S[i]) for i in range(3)])
    assert squared.tolist() == pytest.approx([ce(*S[i]) + 1.0 for i in range(3)])


def test_mse_needs_same_layer():
    """Other self targets are other exits' heads, on other scales; without a self target mse would do nothing."""
    from matryoshka_reranker.config import TrainParams

    assert TrainParams(train_method="same_layer_mse").train_method == "same_layer_mse"
    for name in ("distill_last_layer_mse", "teacher_mse", "distill_fix_layer_teacher_mse"):
        with pytest.raises(ValueError, match="mse"):
            TrainParams(train_method=name)


def test_final_layer_works_with_teacher_unlike_upstream():
    _, per_layer = run("final_layer_teacher")
    assert per_layer[0] == pytest.approx(ce(*S[0]) + soft(S[0], T) + soft(S[0], F[2]))


def test_targets_are_detached_and_batches_average():
    student = [torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True) for _ in range(2)]
    full = [torch.tensor([[0.0, 1.0], [1.0, 1.0]], requires_grad=True) for _ in range(2)]
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss, per_layer = matryoshka_loss(student, TrainMethod("distill_last_layer_teacher"), full, teacher)
    loss.backward()
    assert all(f.grad is None for f in full) and teacher.grad is None
    assert all(s.grad is not None for s in student)
    expected_deepest = (ce(1, 0) + ce(0, 2)) / 2 + (soft((1, 0), (1, 0)) + soft((0, 2), (0, 1))) / 2
    assert per_layer[-1].item() == pytest.approx(expected_deepest)


@pytest.mark.parametrize("method", ["same_layer", "same_layer_mse", "distill_fix_layer_teacher"])
def test_every_self_target_is_detached_whatever_the_distance(method):
    """"Every target is detached": the squared-error target too (the soft cross-entropy one detaches inside
    ``soft_ce``; the mse branch detaches on its own, and dropping it went unnoticed by the value tests)."""
    student = [torch.tensor([s], requires_grad=True) for s in S[:3]]
    full = [torch.tensor([f], requires_grad=True) for f in F[:3]]
    teacher = torch.tensor([T], requires_grad=True)
    loss, _ = matryoshka_loss(student, TrainMethod(method, 2), full, teacher)
    loss.backward()
    assert all(f.grad is None for f in full) and teacher.grad is None
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


def test_without_full_scores_the_student_is_its_own_detached_teacher():
    student = [torch.tensor([s]) for s in S[:3]]
    _, per_layer = matryoshka_loss(student, TrainMethod("last_layer"))
    assert per_layer.tolist() == pytest.approx([ce(*S[0]) + soft(S[0], S[1]), ce(*S[1]) + soft(S[1], S[2]), ce(*S[2])])


def test_missing_or_misshapen_teacher_scores_are_clear():
    student = [torch.zeros(2, 3)]
    with pytest.raises(ValueError, match="needs teacher scores"):
        matryoshka_loss(student, TrainMethod("distill"))
    with pytest.raises(ValueError, match="teacher_scores"):
        matryoshka_loss(student, TrainMethod("teacher"), teacher_scores=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="fix_layer_every"):
        TrainMethod("fix_layer", fix_layer_every=0)


def test_layer_weights_scale_each_exit_and_its_gradient():
    student = [torch.tensor([s], requires_grad=True) for s in S[:3]]
    plain, per_layer = matryoshka_loss(student, TrainMethod("last_layer"))
    weighted, same = matryoshka_loss(student, TrainMethod("last_layer"), weights=[4.0, 1.0, 0.0])
    assert same.tolist() == per_layer.tolist()  # the logged per-exit losses stay unweighted
    assert weighted.item() == pytest.approx(4 * per_layer[0].item() + per_layer[1].item())
    weighted.backward()
    assert student[2].grad.abs().sum() == 0 and student[0].grad.abs().sum() > 0  # weight 0: no gradient of its own
    with pytest.raises(ValueError, match="one weight >= 0 per exit"):
        matryoshka_loss(student, TrainMethod("last_layer"), weights=[1.0, 1.0])
