"""Specification of knowledge_distillation.distillation_loss:

    KL(softmax(teacher/T) || softmax(student/T)) * alpha * T^2 + CE(student, labels) * (1 - alpha)
"""
import math

import pytest
import torch
import torch.nn.functional as F

from compress.training import distillation as kd  # noqa: E402

STUDENT = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
TEACHER = torch.tensor([[1.0, 0.0, -2.0], [-0.5, 2.5, 1.0]])
LABELS = torch.tensor([0, 2])


def softmax(row, temperature):
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def by_hand(student, teacher, labels, temperature, alpha):
    """The formula, written out in plain Python, averaged over the batch."""
    kl = ce = 0.0
    for s, t, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        p_teacher, p_student = softmax(t, temperature), softmax(s, temperature)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_teacher, p_student))
        ce += -math.log(softmax(s, 1.0)[y])
    batch = len(labels)
    return kl / batch * alpha * temperature ** 2 + ce / batch * (1 - alpha)


@pytest.mark.parametrize("temperature, alpha", [(8.0, 0.99), (1.0, 0.5), (4.0, 0.3)])
def test_loss_equals_the_formula_computed_by_hand(temperature, alpha):
    loss = kd.distillation_loss(STUDENT, TEACHER, LABELS, temperature, alpha)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(by_hand(STUDENT, TEACHER, LABELS, temperature, alpha),
                                        rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy():
    loss = kd.distillation_loss(STUDENT, TEACHER, LABELS, temperature=8.0, alpha=0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(STUDENT, LABELS).item(), rel=1e-6)
    assert loss.item() == pytest.approx(by_hand(STUDENT, TEACHER, LABELS, 8.0, 0.0), rel=1e-5)


def test_alpha_one_ignores_the_labels():
    first = kd.distillation_loss(STUDENT, TEACHER, LABELS, 4.0, 1.0)
    other = kd.distillation_loss(STUDENT, TEACHER, torch.tensor([1, 0]), 4.0, 1.0)
    assert first.item() == pytest.approx(other.item(), rel=1e-6)
    assert first.item() > 0


def test_student_equal_to_teacher_leaves_only_the_label_term():
    teacher = TEACHER.double()  # float64, so "zero" can be checked tightly
    alpha = 0.9
    loss = kd.distillation_loss(teacher.clone(), teacher, LABELS, 8.0, alpha)
    expected = F.cross_entropy(teacher, LABELS).item() * (1 - alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    only_kl = kd.distillation_loss(teacher.clone(), teacher, LABELS, 8.0, 1.0)
    assert abs(only_kl.item()) < 1e-12


def test_loss_pulls_the_student_towards_the_teacher():
    student = STUDENT.clone().requires_grad_(True)
    kd.distillation_loss(student, TEACHER, LABELS, 2.0, 1.0).backward()
    stepped = (student - 0.5 * student.grad).detach()
    assert (kd.distillation_loss(stepped, TEACHER, LABELS, 2.0, 1.0)
            < kd.distillation_loss(STUDENT, TEACHER, LABELS, 2.0, 1.0))
