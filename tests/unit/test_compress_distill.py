"""Unit tests of the distillation loss and the training loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shipyard.runtime import distill

STUDENT = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
TEACHER = torch.tensor([[3.0, 0.0, -2.0], [0.0, 1.0, 0.0]])
LABELS = torch.tensor([0, 2])


def _kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    p = F.softmax(teacher / t, dim=-1)
    return (p * (p.log() - F.log_softmax(student / t, dim=-1))).sum(-1).mean()


@pytest.mark.parametrize(
    ("temperature", "alpha"),
    [pytest.param(1.0, 0.5, id="T1"), pytest.param(4.0, 0.5, id="T4"), pytest.param(2.0, 0.9, id="alpha0.9")],
)
def test_distillation_loss_is_alpha_t2_kl_plus_ce(temperature: float, alpha: float) -> None:
    expected = alpha * temperature**2 * _kl(STUDENT, TEACHER, temperature) + (1 - alpha) * F.cross_entropy(
        STUDENT, LABELS
    )
    got = distill.evaluate_distillation_loss("classification", STUDENT, TEACHER, LABELS, temperature, alpha)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        pytest.param(0.0, F.cross_entropy(STUDENT, LABELS).item(), id="ce-only"),
        pytest.param(1.0, 9.0 * _kl(STUDENT, TEACHER, 3.0).item(), id="kl-only"),
    ],
)
def test_distillation_loss_extremes(alpha: float, expected: float) -> None:
    got = distill.evaluate_distillation_loss("classification", STUDENT, TEACHER, LABELS, 3.0, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_student_equal_to_teacher_has_no_kl() -> None:
    assert distill.evaluate_distillation_loss(
        "classification", TEACHER, TEACHER, None, 4.0, 1.0
    ).item() == pytest.approx(0.0, abs=1e-6)


def test_binary_distillation_uses_two_class_logits() -> None:
    student, teacher, labels = torch.tensor([[0.5], [-1.0]]), torch.tensor([[2.0], [-0.5]]), torch.tensor([1.0, 0.0])
    two = lambda z: torch.cat([torch.zeros_like(z), z], dim=1)  # noqa: E731
    expected = distill.evaluate_distillation_loss("classification", two(student), two(teacher), labels.long(), 2.0, 0.5)
    got = distill.evaluate_distillation_loss("binary", student, teacher, labels, 2.0, 0.5)
    assert got.item() == pytest.approx(expected.item())


@pytest.mark.parametrize(
    ("task", "outputs", "labels", "reference", "expected"),
    [
        pytest.param("classification", STUDENT, LABELS, None, F.cross_entropy(STUDENT, LABELS).item(), id="ce"),
        pytest.param("binary", torch.tensor([[0.0]]), torch.tensor([1.0]), None, 0.6931471805599453, id="bce"),
        pytest.param("embedding", torch.tensor([[1.0, 0.0]]), None, torch.tensor([[0.0, 2.0]]), 1.0, id="cosine"),
    ],
)
def test_task_loss(task, outputs, labels, reference, expected) -> None:
    assert distill.evaluate_task_loss(task, outputs, labels, reference).item() == pytest.approx(expected, rel=1e-6)


def test_training_reduces_the_loss_and_writes_tensorboard_events(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2)
    writer = SummaryWriter(log_dir=str(tmp_path))
    losses = distill.apply_training(
        model,
        [x, y],
        lambda b: F.cross_entropy(model(b[0]), b[1]),
        epochs=5,
        lr=0.05,
        batch_size=32,
        seed=0,
        label="toy",
        writer=writer,
    )
    writer.close()
    assert len(losses) == 5 and losses[-1] < losses[0] * 0.7
    assert not model.training
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_training_stops_on_a_diverging_loss() -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="the loss became nan"):
        distill.apply_training(
            model,
            [torch.ones(4, 2)],
            lambda b: model(b[0]).sum() * float("nan"),
            epochs=1,
            lr=0.1,
            batch_size=2,
            seed=0,
            label="toy",
        )
