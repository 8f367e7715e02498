"""Quantization schemes: names -> torchao 0.18 `quantize_` configurations, and applying them to a module.

The scheme table is pure data; `apply_quantization` mutates a module in place (no file or network I/O).
The artifact loader (`shipyard.runtime.artifacts.store`) uses the same table to rebuild quantized layouts, so a
scheme name recorded in a manifest always means the same torchao configuration.

Supported schemes:

- `int8-dynamic`: `Int8DynamicActivationInt8WeightConfig` on `nn.Linear` (int8 per-row weights, activations
  quantized per token at run time);
- `int8-weight-only`: `Int8WeightOnlyConfig` on `nn.Linear` (int8 per-row weights, fp32 activations);
- `int8-embedding`: `IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))` on `nn.Embedding`
  (one scale per row of the table);
- `fp8`: `Float8DynamicActivationFloat8WeightConfig` on `nn.Linear` (CUDA only);
- `int4-weight-only`: `Int4WeightOnlyConfig` on `nn.Linear` (CUDA only, bfloat16 activations).

`torch.ao.quantization` is deprecated and is used only as a benchmark baseline (bench/compression.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

SCHEMES: dict[str, str] = {
    "int8-dynamic": "int8 weights per output row, activations quantized per token at run time (nn.Linear)",
    "int8-weight-only": "int8 weights per output row, fp32 activations (nn.Linear)",
    "int8-embedding": "int8 embedding tables, one scale per row (nn.Embedding)",
    "fp8": "float8 e4m3 weights and activations (nn.Linear, CUDA only)",
    "int4-weight-only": "int4 weights in groups of 128 (nn.Linear, CUDA only, bfloat16)",
}
CUDA_ONLY_SCHEMES = frozenset({"fp8", "int4-weight-only"})
EMBEDDING_SCHEMES = frozenset({"int8-embedding"})
MIN_EMBEDDING_DIM = 8  # narrower tables stay fp32 under int8-embedding


class QuantizationError(ValueError):
    """A scheme cannot be applied (unknown name, needs CUDA, nothing to quantize)."""


@dataclasses.dataclass(frozen=True)
class QuantizationRecord:
    """What was quantized: the scheme and the fully qualified names of the modules it replaced weights in."""

    scheme: str
    modules: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "modules": list(self.modules)}


def assess_scheme(scheme: str, *, cuda_available: bool) -> str | None:
    """Why `scheme` cannot run here (a message), or None when it can. Pure."""
    if scheme not in SCHEMES:
        return f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})"
    if scheme in CUDA_ONLY_SCHEMES and not cuda_available:
        return (
            f"quantization scheme {scheme!r} needs a CUDA GPU (torchao has no CPU kernels for it) and none is "
            "available; use int8-dynamic or int8-weight-only on CPU, or run the job on a GPU node"
        )
    return None


def build_module_filter(scheme: str) -> Callable[[Any, str], bool]:
    """The predicate `quantize_` uses to pick the modules a scheme applies to. Pure."""
    import torch.nn as nn

    if scheme in EMBEDDING_SCHEMES:
        return lambda module, fqn: isinstance(module, nn.Embedding)
    return lambda module, fqn: isinstance(module, nn.Linear)


def build_torchao_config(scheme: str) -> Any:
    """The torchao 0.18 config object for a scheme name. Pure (constructs a dataclass)."""
    import torch
    from torchao import quantization as q

    if scheme == "int8-dynamic":
        return q.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if scheme == "int8-weight-only":
        return q.Int8WeightOnlyConfig(set_inductor_config=False)
    if scheme == "int8-embedding":
        return q.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=q.PerAxis(0))
    if scheme == "fp8":
        return q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow())
    if scheme == "int4-weight-only":
        return q.Int4WeightOnlyConfig(group_size=128)
    raise QuantizationError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")


def plan_quantized_modules(model: Any, scheme: str) -> tuple[str, ...]:
    """Names of the modules `scheme` would quantize in `model` (plain-weight ones only). Pure (reads the model)."""
    import torch

    predicate = build_module_filter(scheme)
    names = []
    for fqn, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not (predicate(module, fqn) and isinstance(weight, torch.Tensor) and type(weight.data) is torch.Tensor):
            continue
        if scheme in EMBEDDING_SCHEMES and weight.shape[-1] < MIN_EMBEDDING_DIM:
            continue  # a per-row scale would cost more than the int8 saves (e.g. a bias table of width 1)
        names.append(fqn)
    return tuple(names)


def apply_quantization(
    model: Any, scheme: str, *, modules: tuple[str, ...] | None = None, check_device: bool = True
) -> QuantizationRecord:
    """Quantize `model` in place with `scheme`, restricted to `modules` when given; returns what changed.

    Raises QuantizationError when the scheme is unknown, needs CUDA that is absent, or matches no module.
    """
    import torch
    from torchao.quantization import quantize_

    problem = assess_scheme(scheme, cuda_available=torch.cuda.is_available() or not check_device)
    if problem:
        raise QuantizationError(problem)
    targets = plan_quantized_modules(model, scheme) if modules is None else tuple(modules)
    if not targets:
        kind = "nn.Embedding" if scheme in EMBEDDING_SCHEMES else "nn.Linear"
        raise QuantizationError(f"quantization scheme {scheme!r} found no {kind} layer to quantize")
    wanted = set(targets)
    known = {fqn for fqn, _ in model.named_modules()}
    missing = sorted(wanted - known)
    if missing:
        raise QuantizationError(f"quantization scheme {scheme!r}: no module named {missing[0]!r} in the model")
    if scheme == "int4-weight-only":
        for fqn in targets:
            model.get_submodule(fqn).to(torch.bfloat16)
    predicate = build_module_filter(scheme)
    quantize_(model, build_torchao_config(scheme), filter_fn=lambda m, fqn: fqn in wanted and predicate(m, fqn))
    return QuantizationRecord(scheme=scheme, modules=targets)
