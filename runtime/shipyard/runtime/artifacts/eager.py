"""The eager `nn.Module` of a factory-kind model: the factory that builds it, and the layers pruning resized.

Imports the factory's module (`module:function`, called with `factory_kwargs`); mutates only the modules it is
given or builds; no file I/O. Structured pruning rebuilds layers with fewer units: the manifest's `structure`
records, per module name, the new dimensions (e.g. `{"fc1": {"type": "Linear", "in_features": 64,
"out_features": 37, "bias": true}}`): `build_structure_diff` derives it on save by comparing the model with a
fresh factory build, and `apply_structure` rebuilds those layers (weights uninitialised) after the factory ran.
Structured pruning (`shipyard.runtime.prune`) builds its smaller layers with the same `build_resized_layer`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from shipyard.runtime.artifacts import ArtifactError, manifests


def build_factory_module(factory: str, factory_kwargs: Mapping[str, Any]) -> Any:
    """Import `module:function` and call it with `factory_kwargs`; the result must be an nn.Module."""
    import torch

    module_name, _, function_name = factory.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(f"factory {factory!r} cannot be imported: {exc}") from exc
    try:
        model = function(**dict(factory_kwargs))
    except Exception as exc:
        raise ArtifactError(f"factory {factory!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ArtifactError(f"factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def apply_structure(model: Any, structure: Mapping[str, Mapping[str, Any]]) -> None:
    """Replace the layers named in `structure` by layers of the recorded dimensions (weights uninitialised)."""
    for fqn, entry in structure.items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError as exc:
            raise ArtifactError(f"structure[{fqn!r}]: the factory's model has no such module") from exc
        kind = entry.get("type")
        if type(old).__name__ != kind:
            raise ArtifactError(f"structure[{fqn!r}]: recorded type {kind}, the factory built {type(old).__name__}")
        try:
            new = build_resized_layer(old, entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"structure[{fqn!r}]: cannot rebuild the layer: {exc}") from exc
        new.train(old.training)
        apply_submodule(model, fqn, new)


def build_resized_layer(old: Any, entry: Mapping[str, Any]) -> Any:
    """A new layer like `old` (same type, kernel, strides, eps, ..., dtype) with the dimensions of a `structure` entry,
    its weights uninitialised. Structured pruning builds its smaller layers with it too, so that what it saves is
    what the loader rebuilds. Raises KeyError/TypeError/ValueError on an entry that does not fit."""
    import torch.nn as nn

    kind = entry["type"]
    dtype = next((p.dtype for p in old.parameters(recurse=False)), None)
    if kind == "Linear":
        return nn.Linear(int(entry["in_features"]), int(entry["out_features"]), bias=bool(entry["bias"]), dtype=dtype)
    if kind in ("Conv1d", "Conv2d", "Conv3d"):
        if old.groups != 1:
            raise ValueError("grouped convolutions cannot be resized")
        return type(old)(
            int(entry["in_channels"]),
            int(entry["out_channels"]),
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            groups=1,
            bias=bool(entry["bias"]),
            padding_mode=old.padding_mode,
            dtype=dtype,
        )
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return type(old)(
            int(entry["num_features"]),
            eps=old.eps,
            momentum=old.momentum,
            affine=old.affine,
            track_running_stats=old.track_running_stats,
            dtype=dtype,
        )
    if kind == "LayerNorm":
        return nn.LayerNorm(
            tuple(int(d) for d in entry["normalized_shape"]),
            eps=old.eps,
            elementwise_affine=old.elementwise_affine,
            bias=old.bias is not None,
            dtype=dtype,
        )
    if kind == "Embedding":
        return nn.Embedding(
            int(entry["num_embeddings"]), int(entry["embedding_dim"]), padding_idx=old.padding_idx, dtype=dtype
        )
    raise ValueError(f"unsupported type {kind}")


def apply_submodule(model: Any, fqn: str, new: Any) -> None:
    """Put `new` in place of `model`'s submodule `fqn` (mutates `model`)."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_structure_diff(reference: Any, model: Any) -> dict[str, dict[str, Any]]:
    """The `structure` entries turning `reference` (as the factory builds it) into `model`'s layer sizes. Pure."""
    reference_modules = dict(reference.named_modules())
    diff: dict[str, dict[str, Any]] = {}
    for fqn, module in model.named_modules():
        if type(module).__name__ not in manifests.RESIZABLE_TYPES or not fqn:
            continue
        ref = reference_modules.get(fqn)
        if ref is None or type(ref) is not type(module):
            raise ArtifactError(f"module {fqn!r} ({type(module).__name__}) is not built by the factory")
        record = build_structure_record(module)
        if record != build_structure_record(ref):
            diff[fqn] = record
    return diff


def build_structure_record(module: Any) -> dict[str, Any]:
    """The dimensions of a resizable layer as recorded in `structure`. Pure."""
    kind = type(module).__name__
    if kind == "Linear":
        return {
            "type": kind,
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if kind in ("Conv1d", "Conv2d", "Conv3d"):
        return {
            "type": kind,
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "bias": module.bias is not None,
        }
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return {"type": kind, "num_features": module.num_features}
    if kind == "LayerNorm":
        return {"type": kind, "normalized_shape": list(module.normalized_shape)}
    if kind == "Embedding":
        return {"type": kind, "num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim}
    raise ArtifactError(f"layer type {kind} cannot be resized (resizable: {', '.join(manifests.RESIZABLE_TYPES)})")

