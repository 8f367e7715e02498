"""Pruning: global L1 unstructured (sparse weights) and Ln structured (physically smaller layers).

Planning (`plan_structured_prune`) is pure: it traces the model with torch.fx, finds each Linear/Conv layer
whose output reaches other Linear/Conv layers only through channel-preserving operations (activations,
dropout, pooling, batch norm, flatten) and ranks its output units by the Ln norm of their weights. Applying a
plan (`apply_structured_prune`) rebuilds those layers with fewer units and slices the dependent batch norms and
the next layers' inputs, so parameter count, bytes and FLOPs really drop. A layer whose output feeds anything
else (a residual addition, the model output, a reshape) is left whole. Nothing here does file or network I/O.

Global pruning uses torch.nn.utils.prune.global_unstructured with L1 magnitude over every Linear and Conv
weight; the masks stay attached during fine-tuning (pruned weights stay zero) and are made permanent by
`apply_prune_removal`.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn as nn

from shipyard.runtime.artifacts import eager

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardswish,
    nn.Mish,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASS_FUNCTIONS = {
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    nn.functional.relu,
    nn.functional.gelu,
    nn.functional.silu,
    nn.functional.dropout,
    nn.functional.leaky_relu,
    nn.functional.max_pool2d,
    nn.functional.avg_pool2d,
    nn.functional.adaptive_avg_pool2d,
    torch.sigmoid,
    nn.functional.elu,
}
_PASS_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}


class PruneError(ValueError):
    """The model cannot be pruned as asked."""


@dataclasses.dataclass(frozen=True)
class Dependent:
    """A layer that must follow a producer's kept units: a norm (sliced), or a consumer (inputs sliced)."""

    fqn: str
    role: str  # "norm" | "consumer"
    group: int = 1  # consumer inputs per producer unit (spatial size after a flatten)


@dataclasses.dataclass(frozen=True)
class StructuredPlan:
    """Keep `keep` (sorted unit indices) of producer `fqn`'s `units` outputs; fix `dependents` to match."""

    fqn: str
    units: int
    keep: tuple[int, ...]
    dependents: tuple[Dependent, ...]


def build_unit_scores(weight: torch.Tensor, norm: int) -> torch.Tensor:
    """Ln norm of each output unit's weights (rows of a Linear, filters of a Conv). Pure."""
    return cast(torch.Tensor, weight.detach().flatten(1).norm(p=norm, dim=1))  # Tensor.norm is typed Any


def build_keep_indices(scores: torch.Tensor, amount: float) -> tuple[int, ...]:
    """Indices of the units to keep: the highest-scoring round(n * (1 - amount)), at least one. Pure."""
    units = int(scores.numel())
    keep = max(1, int(round(units * (1.0 - amount))))
    top = torch.topk(scores, keep, largest=True, sorted=False).indices
    return tuple(sorted(int(i) for i in top))


def _trace(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Any:
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        graph_module = symbolic_trace(model)
    except Exception as exc:
        raise PruneError(
            f"structured pruning needs a model torch.fx can trace ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "use scope global instead"
        ) from exc
    was_training = graph_module.training
    graph_module.eval()
    with torch.no_grad():
        ShapeProp(graph_module).propagate(*example_inputs)
    graph_module.train(was_training)
    return graph_module


def _is_flatten(node: Any) -> bool:
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return bool(start == 1)
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return bool(start == 1)
    if node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target), nn.Flatten):
        module: nn.Flatten = node.graph.owning_module.get_submodule(node.target)
        return module.start_dim == 1 and module.end_dim == -1
    return False


def _follow(graph_module: Any, node: Any, group: int, dependents: list[Dependent]) -> bool:
    """Walk `node`'s users; True when every path ends in a consumer layer through allowed operations."""
    if not node.users:
        return False
    for user in node.users:
        if user.op == "call_module":
            module = graph_module.get_submodule(user.target)
            if isinstance(module, PRUNABLE):
                if getattr(module, "groups", 1) != 1 or user.args[0] is not node:
                    return False
                dependents.append(Dependent(str(user.target), "consumer", group))
                continue
            if isinstance(module, _NORM_MODULES) and group == 1:
                dependents.append(Dependent(str(user.target), "norm"))
                if not _follow(graph_module, user, group, dependents):
                    return False
                continue
            if isinstance(module, _PASS_MODULES) and group == 1:
                if not _follow(graph_module, user, group, dependents):
                    return False
                continue
        if user.op == "call_function" and user.target in _PASS_FUNCTIONS and user.args[0] is node and group == 1:
            if not _follow(graph_module, user, group, dependents):
                return False
            continue
        if user.op == "call_method" and user.target in _PASS_METHODS and group == 1:
            if not _follow(graph_module, user, group, dependents):
                return False
            continue
        if _is_flatten(user) and group == 1:
            shape = node.meta.get("tensor_meta").shape if node.meta.get("tensor_meta") is not None else None
            if shape is None or len(shape) < 2:
                return False
            spatial = 1
            for size in shape[2:]:
                spatial *= int(size)
            if not _follow(graph_module, user, spatial, dependents):
                return False
            continue
        if user.op == "call_function" and user.target is operator.getitem:
            return False
        return False
    return True


def plan_structured_prune(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], amount: float, norm: int = 2
) -> list[StructuredPlan]:
    """Which units of which layers to keep (pure: reads the model, changes nothing)."""
    if not 0.0 < amount < 1.0:
        raise PruneError(f"amount must be in (0, 1), got {amount}")
    graph_module = _trace(model, example_inputs)
    plans = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        module = graph_module.get_submodule(node.target)
        if not isinstance(module, PRUNABLE) or getattr(module, "groups", 1) != 1:
            continue
        dependents: list[Dependent] = []
        if not _follow(graph_module, node, 1, dependents):
            continue
        if not any(d.role == "consumer" for d in dependents):
            continue
        scores = build_unit_scores(module.weight, norm)
        plans.append(
            StructuredPlan(str(node.target), int(scores.numel()), build_keep_indices(scores, amount), tuple(dependents))
        )
    if not plans:
        raise PruneError("structured pruning found no layer whose outputs only feed other Linear/Conv layers")
    return plans


def _rebuild_layer(old: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> nn.Module:
    if not isinstance(old, PRUNABLE):  # the plan only names Linear/Conv producers and consumers
        raise PruneError(f"layer {type(old).__name__} cannot be rebuilt smaller (only Linear and Conv)")
    weight = old.weight.detach()
    bias = old.bias.detach() if old.bias is not None else None
    if out_keep is not None:
        weight = weight[out_keep]
        bias = bias[out_keep] if bias is not None else None
    if in_keep is not None:
        weight = weight[:, in_keep]
    # The layer the artifact's `structure` record rebuilds on load (same builder): new sizes, all else as `old`.
    record = eager.build_structure_record(old)
    if isinstance(old, nn.Linear):
        record.update(in_features=weight.shape[1], out_features=weight.shape[0])
    else:
        record.update(in_channels=weight.shape[1], out_channels=weight.shape[0])
    new: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d = eager.build_resized_layer(old, record)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            assert new.bias is not None  # built with a bias, as `old`
            new.bias.copy_(bias)
    new.train(old.training)
    return new


def _rebuild_norm(old: nn.Module, keep: torch.Tensor) -> nn.Module:
    if not isinstance(old, _NORM_MODULES):  # the plan only names batch norms as norm dependents
        raise PruneError(f"layer {type(old).__name__} cannot be rebuilt smaller (only BatchNorm1d/2d)")
    new = type(old)(
        len(keep), eps=old.eps, momentum=old.momentum, affine=old.affine, track_running_stats=old.track_running_stats
    )
    with torch.no_grad():
        if old.affine:
            new.weight.copy_(old.weight.detach()[keep])
            new.bias.copy_(old.bias.detach()[keep])
        if old.track_running_stats:  # then both have the running buffers (typed Optional)
            assert old.running_mean is not None and old.running_var is not None and old.num_batches_tracked is not None
            assert new.running_mean is not None and new.running_var is not None and new.num_batches_tracked is not None
            new.running_mean.copy_(old.running_mean[keep])
            new.running_var.copy_(old.running_var[keep])
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    new.train(old.training)
    return new


def apply_structured_prune(model: nn.Module, plans: Sequence[StructuredPlan]) -> dict[str, Any]:
    """Rebuild the planned layers smaller, in place; returns {layer: [units before, units after]}."""
    out_keep: dict[str, torch.Tensor] = {}
    in_keep: dict[str, torch.Tensor] = {}
    norm_keep: dict[str, torch.Tensor] = {}
    for plan in plans:
        keep = torch.tensor(plan.keep, dtype=torch.int64)
        out_keep[plan.fqn] = keep
        for dep in plan.dependents:
            if dep.role == "norm":
                norm_keep[dep.fqn] = keep
            else:
                columns = (keep[:, None] * dep.group + torch.arange(dep.group)[None, :]).flatten()
                if dep.fqn in in_keep and not torch.equal(in_keep[dep.fqn], columns):
                    raise PruneError(f"layer {dep.fqn!r} receives inputs from several pruned layers")
                in_keep[dep.fqn] = columns
    for fqn in sorted(set(out_keep) | set(in_keep)):
        old = model.get_submodule(fqn)
        eager.apply_submodule(model, fqn, _rebuild_layer(old, out_keep.get(fqn), in_keep.get(fqn)))
    for fqn, keep in norm_keep.items():
        eager.apply_submodule(model, fqn, _rebuild_norm(model.get_submodule(fqn), keep))
    return {plan.fqn: [plan.units, len(plan.keep)] for plan in plans}


def build_prunable_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every Linear and Conv layer with a plain weight. Pure."""
    return [
        (module, "weight")
        for module in model.modules()
        if isinstance(module, PRUNABLE) and type(module.weight.data) is torch.Tensor
    ]


def apply_global_prune(model: nn.Module, amount: float) -> list[tuple[nn.Module, str]]:
    """Attach global L1 unstructured masks removing `amount` of all Linear/Conv weights (masks stay attached)."""
    from torch.nn.utils import prune

    if not 0.0 < amount < 1.0:
        raise PruneError(f"amount must be in (0, 1), got {amount}")
    parameters = build_prunable_parameters(model)
    if not parameters:
        raise PruneError("global pruning found no Linear or Conv layer")
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=amount)
    return parameters


def apply_prune_removal(parameters: Sequence[tuple[nn.Module, str]]) -> None:
    """Make attached pruning masks permanent (weights become plain tensors with zeros)."""
    from torch.nn.utils import prune

    for module, name in parameters:
        if prune.is_pruned(module):
            prune.remove(module, name)  # type: ignore[no-untyped-call]  # torch leaves prune.remove unannotated


def evaluate_sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over all Linear/Conv layers. Pure."""
    total = zeros = 0
    for module in model.modules():
        if isinstance(module, PRUNABLE):
            weight = module.weight
            if type(weight.data) is not torch.Tensor:
                weight = weight.dequantize() if hasattr(weight, "dequantize") else weight
            total += weight.numel()
            zeros += int((weight == 0).sum())
    return zeros / total if total else 0.0
