"""Training for the compression job: task losses, the distillation loss and a small training loop.

The loss functions (`evaluate_*_loss`) are pure tensor functions. `apply_training` trains a module in place
(compute only; it logs progress and writes TensorBoard scalars through the writer it is given, if any).

Distillation (Hinton et al.): loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
+ (1 - alpha) * CE(student, labels). For a binary task the single logit z is treated as the two-class
logits [0, z]. For an embedding task there are no labels and no class distribution: the student is trained
to match the teacher's vectors (loss = 1 - cosine similarity); alpha and T do not apply.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("shipyard.runtime.compress")


def _two_class(logits: torch.Tensor) -> torch.Tensor:
    z = logits.reshape(-1, 1)
    return torch.cat([torch.zeros_like(z), z], dim=1)


def evaluate_task_loss(
    task: str, outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None
) -> torch.Tensor:
    """The plain training loss of a task: CE, BCE with logits, or 1 - cosine to the reference vectors. Pure."""
    if task == "embedding":
        if reference is None:
            raise ValueError("the embedding loss needs the reference vectors")
        return 1.0 - F.cosine_similarity(outputs, reference, dim=-1).mean()
    if task not in ("classification", "binary"):
        raise ValueError(f"unknown task {task!r}")
    if labels is None:
        raise ValueError(f"the {task} loss needs the dataset's labels")
    if task == "classification":
        return F.cross_entropy(outputs, labels)
    return F.binary_cross_entropy_with_logits(outputs.reshape(-1), labels.reshape(-1).to(outputs.dtype))


def evaluate_distillation_loss(
    task: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels). Pure."""
    if task == "embedding":
        return evaluate_task_loss(task, student, None, teacher)
    if task == "binary":
        student, teacher = _two_class(student), _two_class(teacher)
        labels = labels.reshape(-1).to(torch.int64) if labels is not None else None
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1), reduction="batchmean"
    )
    soft = kl * temperature * temperature
    if labels is None or alpha >= 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student, labels)


def apply_training(
    model: torch.nn.Module,
    tensors: Sequence[torch.Tensor],
    compute_loss: Callable[[list[torch.Tensor]], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    label: str,
    writer: Any = None,
) -> list[float]:
    """Adam over shuffled mini-batches of `tensors` (all indexed by sample); returns the mean loss per epoch."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError(f"{label}: the model has no trainable parameters")
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    total = int(tensors[0].shape[0])
    epoch_losses: list[float] = []
    step = 0
    model.train()
    try:
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            order = torch.randperm(total, generator=generator)
            running, batches = 0.0, 0
            for start in range(0, total, batch_size):
                index = order[start : start + batch_size]
                loss = compute_loss([t[index] for t in tensors])
                value = loss.item()
                if not math.isfinite(value):
                    raise ValueError(f"{label}: the loss became {value} at epoch {epoch}; lower the lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
                optimizer.step()
                running += value
                batches += 1
                step += 1
                if writer is not None:
                    writer.add_scalar(f"{label}/batch_loss", value, step)
            mean = running / max(batches, 1)
            epoch_losses.append(mean)
            if writer is not None:
                writer.add_scalar(f"{label}/epoch_loss", mean, epoch)
            log.info(
                "Trained %s epoch %d/%d: loss %.4f over %d batches in %.2fs",
                label,
                epoch,
                epochs,
                mean,
                batches,
                time.perf_counter() - started,
            )
    finally:
        model.eval()
    return epoch_losses
