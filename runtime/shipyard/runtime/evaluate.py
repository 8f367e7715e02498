"""Quality metrics, the accuracy gate and latency measurement of the compression job.

The metric and gate functions (`evaluate_*`) are pure. `query_outputs` and `query_latency` run a model
(compute only, no file or network I/O).

Metrics per task (the first one is the dataset's primary metric, gated by `maxRelativeAccuracyLoss`):

- classification: `accuracy`;
- binary: `auc` (ROC AUC), then `accuracy` (threshold 0 on the logit, reported, not gated);
- embedding: `cosine` (mean cosine similarity of each output to the source model's output for the same input),
  then `nn_agreement` (fraction of samples whose nearest other sample, by cosine, is the same under the
  candidate as under the source model), gated with its own default tolerance (0.05) because a
  nearest-neighbour flip is far coarser than a cosine change.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

PRIMARY_METRIC = {"classification": "accuracy", "binary": "auc", "embedding": "cosine"}
DEFAULT_TOLERANCES = {"nn_agreement": 0.05}  # metrics gated beyond the primary, with their default tolerance
REPORTED_ONLY = {"binary": ("accuracy",)}


@dataclasses.dataclass(frozen=True)
class MetricCheck:
    metric: str
    before: float
    after: float
    relative_loss: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.relative_loss <= self.tolerance + 1e-12

    def describe(self) -> str:
        verdict = "<=" if self.passed else ">"
        return (
            f"{self.metric} {self.before:.4f} -> {self.after:.4f} (relative loss {self.relative_loss:.2%} "
            f"{verdict} tolerance {self.tolerance:.2%})"
        )


@dataclasses.dataclass(frozen=True)
class GateDecision:
    accepted: bool
    checks: tuple[MetricCheck, ...]

    @property
    def failures(self) -> tuple[MetricCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "checks": [
                {
                    "metric": c.metric,
                    "before": c.before,
                    "after": c.after,
                    "relativeLoss": c.relative_loss,
                    "tolerance": c.tolerance,
                    "passed": c.passed,
                }
                for c in self.checks
            ],
        }


def evaluate_relative_loss(before: float, after: float) -> float:
    """(before - after) / before for a higher-is-better metric; 0 when it improved. Pure."""
    if after >= before:
        return 0.0
    if before <= 0:
        return math.inf
    return (before - after) / before


def evaluate_gate(
    task: str,
    before: Mapping[str, float],
    after: Mapping[str, float],
    tolerance: float,
    overrides: Mapping[str, float] | None = None,
) -> GateDecision:
    """Accept only when every gated metric's relative loss is within its tolerance. Pure."""
    tolerances = {PRIMARY_METRIC[task]: tolerance}
    for metric, default in DEFAULT_TOLERANCES.items():
        if metric in before:
            tolerances[metric] = default
    tolerances.update({k: v for k, v in (overrides or {}).items() if k in before})
    checks = tuple(
        MetricCheck(metric, before[metric], after[metric], evaluate_relative_loss(before[metric], after[metric]), tol)
        for metric, tol in tolerances.items()
    )
    return GateDecision(accepted=all(c.passed for c in checks), checks=checks)


def evaluate_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).to(torch.float64).mean())


def evaluate_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of scores against 0/1 labels (scikit-learn's roc_auc_score); NaN with a single class. Pure."""
    from sklearn.metrics import roc_auc_score

    y = labels.reshape(-1).to(torch.int64).numpy()
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, scores.reshape(-1).double().numpy()))


def evaluate_cosine(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of corresponding rows. Pure."""
    return float(torch.nn.functional.cosine_similarity(outputs.double(), reference.double(), dim=-1).mean())


def evaluate_nn_agreement(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (cosine) is the same in `outputs` as in `reference`. Pure."""

    def nearest(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.double(), dim=-1)
        similarity = x @ x.T
        similarity.fill_diagonal_(-math.inf)
        return similarity.argmax(dim=-1)

    return float((nearest(outputs) == nearest(reference)).to(torch.float64).mean())


def evaluate_metrics(
    task: str, outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None = None
) -> dict[str, float]:
    """All metrics of a task for a model's outputs (reference = the source model's outputs). Pure."""
    if task == "embedding":
        if reference is None:
            raise ValueError("embedding metrics need the source model's outputs")
        return {
            "cosine": evaluate_cosine(outputs, reference),
            "nn_agreement": evaluate_nn_agreement(outputs, reference),
        }
    if task not in ("classification", "binary"):
        raise ValueError(f"unknown task {task!r}")
    if labels is None:
        raise ValueError(f"{task} metrics need the dataset's labels")
    if task == "classification":
        return {"accuracy": evaluate_accuracy(outputs, labels)}
    logits = outputs.reshape(-1)
    return {
        "auc": evaluate_auc(logits, labels),
        "accuracy": float(((logits > 0).to(labels.dtype) == labels).to(torch.float64).mean()),
    }


def _forward(module: Any, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    out = module(*inputs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return cast(torch.Tensor, out)  # the model is any callable: its output is declared, not checked


def query_outputs(module: Any, inputs: Sequence[torch.Tensor], *, batch_size: int = 256) -> torch.Tensor:
    """Run the model over all samples in chunks; returns the concatenated float outputs."""
    chunks = []
    total = int(inputs[0].shape[0])
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            chunks.append(_forward(module, [t[start : start + batch_size] for t in inputs]).float())
    return torch.cat(chunks)


def build_batch(inputs: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """The first `batch_size` samples, repeated when the set is smaller. Pure."""
    total = int(inputs[0].shape[0])
    index = torch.arange(batch_size) % total
    return [t[index].contiguous() for t in inputs]


def query_interleaved_latency(
    modules: Mapping[str, Any],
    inputs: Sequence[torch.Tensor],
    batch_sizes: Sequence[int],
    *,
    budget_s: float = 1.0,
    rounds: int = 3,
) -> dict[str, dict[int, dict[str, float]]]:
    """Latency of several forms of a model measured side by side: at each batch size, `rounds` rounds that time
    every module once for `budget_s / rounds` seconds; p50 and p90 are the medians of the rounds' (so that load on a
    shared node hits every form alike). Returns {name: {batch: {p50_ms, p90_ms, iterations}}}."""
    samples: dict[str, dict[int, list[dict[str, float]]]] = {n: {b: [] for b in batch_sizes} for n in modules}
    for batch in batch_sizes:
        for _ in range(rounds):
            for name, module in modules.items():
                samples[name][batch].append(
                    query_latency(module, inputs, batch, budget_s=budget_s / rounds, min_iterations=5, warmup=3)
                )
    return {
        name: {
            batch: {
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "p90_ms": statistics.median(r["p90_ms"] for r in runs),
                "iterations": float(sum(r["iterations"] for r in runs)),
            }
            for batch, runs in per.items()
        }
        for name, per in samples.items()
    }


def query_latency(
    module: Any,
    inputs: Sequence[torch.Tensor],
    batch_size: int,
    *,
    budget_s: float = 1.0,
    min_iterations: int = 10,
    max_iterations: int = 2000,
    warmup: int = 5,
) -> dict[str, float]:
    """p50 (and p90) wall time of one forward pass at `batch_size`, measured for about `budget_s` seconds."""
    batch = build_batch(inputs, batch_size)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            _forward(module, batch)
        started = time.perf_counter()
        while len(times) < max_iterations and (len(times) < min_iterations or time.perf_counter() - started < budget_s):
            t0 = time.perf_counter()
            _forward(module, batch)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "p50_ms": statistics.median(times) * 1e3,
        "p90_ms": times[min(len(times) - 1, int(len(times) * 0.9))] * 1e3,
        "iterations": float(len(times)),
    }
