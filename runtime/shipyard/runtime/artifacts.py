"""The Shipyard model format: a model directory with a `shipyard-model.json` manifest and weight files.

Reads and writes files (model directories); never unpickles arbitrary objects. Used by the compression Job
(`shipyard-runtime compress`) to write its artifact and by the inference server to load a model.

A model directory (a source model shipped in an image, and a compression output alike) holds:

- `shipyard-model.json`, the manifest::

      {"format": 1, "name": "digits", "kind": "factory",
       "factory": "pkg.module:function", "factory_kwargs": {...},
       "weights": "weights.safetensors", "encoding": "safetensors",
       "inputs":  [{"name": "input",  "datatype": "FP32", "shape": [-1, 64]}],
       "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
       "structure": {}, "quantization": [], "tensors": {},
       "files": {"weights.safetensors": {"sha256": "<hex>", "bytes": 1234}},
       "metadata": {}, "digest": "sha256:<hex>"}

- the weights file named by `weights`.

Kinds (the model contract, docs/model-contract.md):

- `factory`: a Python factory `module:function` (called with `factory_kwargs`) builds the `nn.Module`; its
  weights are a safetensors file (`encoding: safetensors`), the same zstd-compressed
  (`encoding: safetensors+zstd`, so that pruned weights show in bytes), or a plain state_dict written by
  `torch.save` (`encoding: torch-state-dict`), read with `torch.load(weights_only=True)` only.
- `export`: a `torch.export` program (`torch.export.save`, `weights` names the `.pt2` file). Every pickle
  inside the archive is checked with `torch.load(weights_only=True)` before `torch.export.load` runs,
  because `torch.export.load` itself falls back to full unpickling.

Compressed layouts. Structured pruning rebuilds layers with fewer units: `structure` records, per module name,
the new dimensions (e.g. `{"fc1": {"type": "Linear", "in_features": 64, "out_features": 37, "bias": true}}`)
and the loader rebuilds those layers after calling the factory. Quantized weights are torchao tensor
subclasses: they are stored as their plain inner tensors (`<param>::qdata` int8, `<param>::scale` fp32, ...),
`quantization` records the scheme and the module names, and the loader re-applies the same torchao scheme to
those modules (which fixes the layout: block sizes, dtypes) and then overwrites every inner tensor with the
stored bytes, so the stored int8 data is exactly what runs; `tensors` records the subclass type and inner
tensor names of each such parameter, checked on load.

Digest. `files` holds the sha256 and size of every file the model is made of, and `digest` is the sha256 of
the canonical JSON of the manifest without `digest` (sorted keys, no spaces): it covers the weights through
`files` and everything that decides how they are interpreted. A hand-written source manifest may omit
`files` and `digest`: the loader then computes them (and `LoadedModel.digest` is that computed value).

Compiled package (optional). A factory-kind artifact may also carry an AOTInductor package of the same model
for fast CPU serving: `"compiled": {"file": "model.cpu.pt2", "format": "aotinductor", "device": "cpu",
"torch": "<version that compiled it>", "maxBatchSize": 1024}`, listed in `files` (so covered by the digest).
It is native code (a shared library inside the zip): `load_model(..., compiled=True)` loads it only on explicit
request, after the digest check, and only with the torch version that built it; by default the eager module is
built from the weights. The inference server asks for it when it fits its configuration (`serve --compiled`,
`assess_compiled`). Shapes: the first dimension of every input is the batch (1..maxBatchSize); any other
-1 dimension is dynamic too, with the range torch.export infers from the model (e.g. at most 512 tokens).

Writes are atomic: everything is written into a temporary sibling directory which is renamed into place, so
a partial artifact is never visible under the final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

MANIFEST_FILE = "shipyard-model.json"
FORMAT_VERSION = 1
KINDS = ("factory", "export")
ENCODINGS = ("safetensors", "safetensors+zstd", "torch-state-dict")
DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
)
MAX_MANIFEST_BYTES = 1 << 20
INNER_SEPARATOR = "::"
RESIZABLE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Embedding")
COMPILED_FORMAT = "aotinductor"
_PICKLE_PROTOCOL_BYTE = 0x80
_ZIP_MAGIC = b"PK\x03\x04"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ArtifactError(ValueError):
    """A model directory cannot be read or written; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model, in Open Inference Protocol terms (-1 = variable dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: `module(*tensors)` takes tensors in the order of `inputs`."""

    module: Any  # torch.nn.Module, in eval mode
    manifest: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    digest: str
    path: Path

    @property
    def name(self) -> str:
        return str(self.manifest["name"])


# ----------------------------------------------------------------------------------------------------------
# Pure helpers: specs, manifest validation, digest.


def build_tensor_spec(raw: Any, where: str) -> TensorSpec:
    """Parse one `inputs[i]`/`outputs[i]` entry; raises ArtifactError naming the field. Pure."""
    if isinstance(raw, TensorSpec):
        raw = raw.to_dict()
    if not isinstance(raw, Mapping):
        raise ArtifactError(f"{where}: must be an object with name, datatype and shape")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{where}.name: must be a non-empty string")
    if datatype not in DATATYPES:
        raise ArtifactError(f"{where}.datatype: must be one of {', '.join(DATATYPES)}, got {datatype!r}")
    if (
        not isinstance(shape, Sequence)
        or isinstance(shape, str)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and (d == -1 or d > 0) for d in shape)
    ):
        raise ArtifactError(f"{where}.shape: must be a non-empty list of positive sizes or -1, got {shape!r}")
    return TensorSpec(name=name, datatype=datatype, shape=tuple(shape))


def build_tensor_specs(raw: Any, where: str) -> tuple[TensorSpec, ...]:
    """Parse an `inputs` or `outputs` list. Pure."""
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise ArtifactError(f"{where}: must be a non-empty list of tensor specs")
    specs = tuple(build_tensor_spec(item, f"{where}[{i}]") for i, item in enumerate(raw))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ArtifactError(f"{where}: tensor names must be unique, got {names}")
    return specs


def build_digest(manifest: Mapping[str, Any]) -> str:
    """`sha256:<hex>` of the canonical JSON of the manifest without its `digest` field. Pure."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def assess_manifest(manifest: Any) -> list[str]:
    """Every problem with a manifest's shape (empty list = valid). Pure; files are checked on load."""
    if not isinstance(manifest, Mapping):
        return ["manifest: must be a JSON object"]
    problems: list[str] = []
    if manifest.get("format") != FORMAT_VERSION:
        problems.append(f"format: must be {FORMAT_VERSION}, got {manifest.get('format')!r}")
    if not isinstance(manifest.get("name"), str) or not manifest.get("name"):
        problems.append("name: must be a non-empty string")
    kind = manifest.get("kind")
    if kind not in KINDS:
        problems.append(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    weights = manifest.get("weights")
    if not isinstance(weights, str) or not _is_plain_file_name(weights):
        problems.append(f"weights: must be a file name inside the model directory, got {weights!r}")
    if kind == "factory":
        factory = manifest.get("factory")
        if not isinstance(factory, str) or factory.count(":") != 1 or not all(factory.split(":")):
            problems.append(f"factory: must be 'package.module:function', got {factory!r}")
        if not isinstance(manifest.get("factory_kwargs", {}), Mapping):
            problems.append("factory_kwargs: must be an object")
        encoding = manifest.get("encoding", "safetensors")
        if encoding not in ENCODINGS:
            problems.append(f"encoding: must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    for field in ("inputs", "outputs"):
        try:
            build_tensor_specs(manifest.get(field), field)
        except ArtifactError as exc:
            problems.append(str(exc))
    problems += _assess_structure(manifest.get("structure", {}))
    compiled = manifest.get("compiled")
    if compiled is not None:
        if (
            not isinstance(compiled, Mapping)
            or compiled.get("format") != COMPILED_FORMAT
            or not _is_plain_file_name(compiled.get("file"))
        ):
            problems.append(f"compiled: must be {{format: {COMPILED_FORMAT}, file: <name>, device, torch}}")
        elif isinstance(manifest.get("files"), Mapping) and compiled["file"] not in manifest["files"]:
            problems.append(f"files: does not list the compiled package {compiled['file']!r}")
    problems += _assess_quantization(manifest.get("quantization", []))
    files = manifest.get("files")
    if files is not None:
        if not isinstance(files, Mapping):
            problems.append("files: must be an object of file name -> {sha256, bytes}")
        else:
            for name, entry in files.items():
                if not _is_plain_file_name(name):
                    problems.append(f"files: {name!r} is not a file name inside the model directory")
                elif (
                    not isinstance(entry, Mapping)
                    or not isinstance(entry.get("sha256"), str)
                    or not isinstance(entry.get("bytes"), int)
                ):
                    problems.append(f"files[{name!r}]: must be {{sha256: <hex>, bytes: <int>}}")
            if isinstance(weights, str) and weights not in files:
                problems.append(f"files: does not list the weights file {weights!r}")
    digest = manifest.get("digest")
    if digest is not None and (not isinstance(digest, str) or not digest.startswith("sha256:")):
        problems.append(f"digest: must be 'sha256:<hex>', got {digest!r}")
    if digest is not None and files is None:
        problems.append("digest: a manifest with a digest must list its files (files: {...})")
    return problems


def _assess_structure(structure: Any) -> list[str]:
    if not isinstance(structure, Mapping):
        return ["structure: must be an object of module name -> new dimensions"]
    problems = []
    for fqn, entry in structure.items():
        if not isinstance(entry, Mapping) or entry.get("type") not in RESIZABLE_TYPES:
            problems.append(f"structure[{fqn!r}].type: must be one of {', '.join(RESIZABLE_TYPES)}")
    return problems


def _assess_quantization(records: Any) -> list[str]:
    from shipyard.runtime import quantize

    if not isinstance(records, Sequence) or isinstance(records, str):
        return ["quantization: must be a list of {scheme, modules}"]
    problems = []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping) or record.get("scheme") not in quantize.SCHEMES:
            problems.append(f"quantization[{i}].scheme: must be one of {', '.join(quantize.SCHEMES)}")
        elif not isinstance(record.get("modules"), Sequence) or not all(isinstance(m, str) for m in record["modules"]):
            problems.append(f"quantization[{i}].modules: must be a list of module names")
    return problems


def _is_plain_file_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and name not in {".", ".."}
        and "/" not in name
        and "\\" not in name
        and name != MANIFEST_FILE
    )


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
    raise ArtifactError(f"layer type {kind} cannot be resized (resizable: {', '.join(RESIZABLE_TYPES)})")


# ----------------------------------------------------------------------------------------------------------
# Building modules from a manifest (imports the factory; mutates only the module it builds).


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
    import torch.nn as nn

    for fqn, entry in structure.items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError as exc:
            raise ArtifactError(f"structure[{fqn!r}]: the factory's model has no such module") from exc
        kind = entry.get("type")
        if type(old).__name__ != kind:
            raise ArtifactError(f"structure[{fqn!r}]: recorded type {kind}, the factory built {type(old).__name__}")
        try:
            new = _build_resized(old, entry, nn)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"structure[{fqn!r}]: cannot rebuild the layer: {exc}") from exc
        new.train(old.training)
        _set_submodule(model, fqn, new)


def _build_resized(old: Any, entry: Mapping[str, Any], nn: Any) -> Any:
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


def _set_submodule(model: Any, fqn: str, new: Any) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_structure_diff(reference: Any, model: Any) -> dict[str, dict[str, Any]]:
    """The `structure` entries turning `reference` (as the factory builds it) into `model`'s layer sizes. Pure."""
    reference_modules = dict(reference.named_modules())
    diff: dict[str, dict[str, Any]] = {}
    for fqn, module in model.named_modules():
        if type(module).__name__ not in RESIZABLE_TYPES or not fqn:
            continue
        ref = reference_modules.get(fqn)
        if ref is None or type(ref) is not type(module):
            raise ArtifactError(f"module {fqn!r} ({type(module).__name__}) is not built by the factory")
        record = build_structure_record(module)
        if record != build_structure_record(ref):
            diff[fqn] = record
    return diff


# ----------------------------------------------------------------------------------------------------------
# State dicts <-> plain tensors.


def _is_subclass_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, torch.nn.Parameter)


def build_plain_state(model: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Flatten a state_dict into plain tensors: subclass weights become `<key>::<inner>` entries.

    Returns (tensors, layouts) where layouts[key] = {"type": subclass name, "inner": [inner names]}.
    """
    import torch

    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, dict[str, Any]] = {}
    for key, value in model.state_dict().items():
        if _is_subclass_tensor(value):
            inner_names, _ = value.__tensor_flatten__()
            for inner in inner_names:
                tensor = getattr(value, inner)
                if _is_subclass_tensor(tensor):
                    raise ArtifactError(f"tensor {key!r}: nested tensor subclasses cannot be stored")
                tensors[f"{key}{INNER_SEPARATOR}{inner}"] = tensor.detach().contiguous().clone()
            layouts[key] = {"type": type(value).__name__, "inner": list(inner_names)}
        else:
            tensors[key] = value.detach().contiguous().clone()
    return tensors, layouts


def apply_plain_state(model: Any, tensors: Mapping[str, Any], layouts: Mapping[str, Mapping[str, Any]]) -> None:
    """Copy stored plain tensors into `model` (whose layers already have the right sizes and layouts)."""
    import torch

    expected = model.state_dict()
    consumed: set[str] = set()
    with torch.no_grad():
        for key, target in expected.items():
            if _is_subclass_tensor(target):
                layout = layouts.get(key)
                inner_names, _ = target.__tensor_flatten__()
                if (
                    layout is None
                    or layout.get("type") != type(target).__name__
                    or list(layout["inner"]) != list(inner_names)
                ):
                    raise ArtifactError(
                        f"weights: tensor {key!r} is stored as {layout} but the model expects "
                        f"{type(target).__name__} with {list(inner_names)}"
                    )
                for inner in inner_names:
                    stored_key = f"{key}{INNER_SEPARATOR}{inner}"
                    _copy_checked(getattr(target, inner), tensors.get(stored_key), stored_key)
                    consumed.add(stored_key)
            else:
                if key in layouts:
                    raise ArtifactError(f"weights: tensor {key!r} is stored quantized but the model expects plain")
                _copy_checked(target, tensors.get(key), key)
                consumed.add(key)
    unexpected = sorted(set(tensors) - consumed)
    if unexpected:
        raise ArtifactError(f"weights: {len(unexpected)} stored tensors are not in the model, e.g. {unexpected[0]!r}")


def _copy_checked(target: Any, stored: Any, key: str) -> None:
    if stored is None:
        raise ArtifactError(f"weights: tensor {key!r} is missing")
    if tuple(stored.shape) != tuple(target.shape) or stored.dtype != target.dtype:
        raise ArtifactError(
            f"weights: tensor {key!r} has shape {tuple(stored.shape)} {stored.dtype}, "
            f"the model expects {tuple(target.shape)} {target.dtype}"
        )
    target.copy_(stored)


# ----------------------------------------------------------------------------------------------------------
# Encodings.


def build_encoded_weights(tensors: Mapping[str, Any], encoding: str, *, zstd_level: int | None = None) -> bytes:
    """Serialise plain tensors in `encoding` (safetensors or safetensors+zstd). Pure (returns bytes)."""
    from safetensors.torch import save

    raw = save(dict(tensors))
    if encoding == "safetensors":
        return raw
    if encoding == "safetensors+zstd":
        import zstandard

        level = zstd_level if zstd_level is not None else (19 if len(raw) <= 16 << 20 else 9)
        return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    raise ArtifactError(f"encoding {encoding!r} cannot be written (writable: safetensors, safetensors+zstd)")


def load_weight_tensors(path: Path, encoding: str, *, expected_sha256: str | None = None) -> dict[str, Any]:
    """Read a weights file into plain tensors without unpickling anything beyond plain tensors.

    With `expected_sha256`, the bytes actually read are checked (not only the file as hashed earlier).
    """
    import torch

    data = _read_bytes(path)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ArtifactError(f"digest mismatch: weights {path.name} changed while being loaded")
    head = data[:4]
    if encoding == "torch-state-dict":
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ArtifactError(
                f"weights {path.name}: refused to load: not a plain state_dict of tensors "
                f"(torch.load(weights_only=True) rejected it: {str(exc).splitlines()[0]})"
            ) from exc
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ArtifactError(f"weights {path.name}: must hold a dict of tensor name -> tensor")
        return dict(state)
    if encoding == "safetensors+zstd":
        if head != _ZSTD_MAGIC:
            raise ArtifactError(f"weights {path.name}: encoding is safetensors+zstd but the file is not zstd data")
        data = _zstd_decompress(data, path)
        head = data[:4]
    if head == _ZIP_MAGIC or (data[:1] and data[0] == _PICKLE_PROTOCOL_BYTE):
        raise ArtifactError(
            f"weights {path.name}: refused to load: the file is a pickle (torch.save), not safetensors; "
            "pickles can run arbitrary code when loaded"
        )
    from safetensors.torch import load

    try:
        return dict(load(data))
    except Exception as exc:
        raise ArtifactError(f"weights {path.name}: not a valid safetensors file: {exc}") from exc


def _zstd_decompress(data: bytes, path: Path) -> bytes:
    import zstandard

    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise ArtifactError(f"weights {path.name}: corrupt zstd data: {exc}") from exc
    size = params.content_size
    if size <= 0 or size > 64 << 30:
        raise ArtifactError(f"weights {path.name}: zstd frame does not declare a plausible content size")
    try:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ArtifactError(f"weights {path.name}: corrupt zstd data: {exc}") from exc


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(f"weights file {path.name} is missing from {path.parent}") from exc
    except OSError as exc:
        raise ArtifactError(f"weights file {path}: cannot be read: {exc}") from exc


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# ----------------------------------------------------------------------------------------------------------
# Loading.


def load_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate `shipyard-model.json` in a model directory (files are not hashed here)."""
    directory = Path(path)
    manifest_path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise ArtifactError(f"model directory {directory} does not exist")
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{directory} is not a model directory: {MANIFEST_FILE} is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON: {exc}") from exc
    problems = assess_manifest(manifest)
    if problems:
        raise ArtifactError(f"{manifest_path}: " + "; ".join(problems))
    return dict(manifest)


def load_verified_manifest(path: str | os.PathLike[str], *, expected_digest: str | None = None) -> dict[str, Any]:
    """Read a manifest and check every listed file's size and sha256 and the manifest digest.

    Returns the manifest completed with `files` and `digest` (computed when a source manifest omits them).
    """
    directory = Path(path)
    manifest = load_manifest(directory)
    files = manifest.get("files")
    if files is None:
        files = {}
        for name in [manifest["weights"]]:
            file_path = directory / name
            if not file_path.is_file():
                raise ArtifactError(f"weights file {name} is missing from {directory}")
            sha, size = _sha256_file(file_path)
            files[name] = {"sha256": sha, "bytes": size}
        manifest["files"] = files
    else:
        for name, entry in files.items():
            file_path = directory / name
            if not file_path.is_file():
                raise ArtifactError(f"file {name} listed in the manifest is missing from {directory}")
            sha, size = _sha256_file(file_path)
            if size != entry["bytes"] or sha != entry["sha256"]:
                raise ArtifactError(
                    f"digest mismatch: {name} has sha256:{sha} ({size} bytes), the manifest records "
                    f"sha256:{entry['sha256']} ({entry['bytes']} bytes); the artifact is corrupt or was modified"
                )
    computed = build_digest(manifest)
    recorded = manifest.get("digest")
    if recorded is not None and recorded != computed:
        raise ArtifactError(
            f"digest mismatch: the manifest records {recorded} but its content hashes to {computed}; "
            "the artifact is corrupt or was modified"
        )
    if expected_digest is not None and expected_digest != computed:
        raise ArtifactError(f"digest mismatch: expected {expected_digest}, the model directory has {computed}")
    manifest["digest"] = computed
    return manifest


def load_model(
    path: str | os.PathLike[str], *, device: str = "cpu", expected_digest: str | None = None, compiled: bool = False
) -> LoadedModel:
    """Load a model directory (source or compressed), verifying its digest; the module is in eval mode.

    `compiled=True` loads the artifact's AOTInductor package instead of building the eager module (an
    ArtifactError when there is none for `device` or it was built by another torch version).
    Raises ArtifactError naming the problem: missing manifest or weights, digest mismatch, pickled payload,
    weights that do not fit the factory's model, unknown factory.
    """
    directory = Path(path).resolve()
    manifest = load_verified_manifest(directory, expected_digest=expected_digest)
    return load_model_from_manifest(manifest, directory, device=device, compiled=compiled)


def load_model_from_manifest(
    manifest: Mapping[str, Any], directory: Path, *, device: str = "cpu", compiled: bool = False
) -> LoadedModel:
    """`load_model` after its digest check: `manifest` must come from `load_verified_manifest(directory)`."""
    if compiled:
        module = load_compiled_module(manifest, directory, device=device)
    elif manifest["kind"] == "export":
        module = _to_device(load_exported_module(directory / manifest["weights"]), device)
    else:
        module = build_model_from_manifest(manifest, directory, device=device)
    return LoadedModel(
        module=module,
        manifest=manifest,
        inputs=build_tensor_specs(manifest["inputs"], "inputs"),
        outputs=build_tensor_specs(manifest["outputs"], "outputs"),
        digest=manifest["digest"],
        path=directory,
    )


def build_model_from_manifest(manifest: Mapping[str, Any], directory: Path, *, device: str = "cpu") -> Any:
    """Build a factory-kind model: factory -> resized layers -> quantized layouts -> stored tensors."""
    from shipyard.runtime import quantize

    weights = manifest["weights"]
    tensors = load_weight_tensors(
        directory / weights,
        manifest.get("encoding", "safetensors"),
        expected_sha256=manifest.get("files", {}).get(weights, {}).get("sha256"),
    )
    model = build_factory_module(manifest["factory"], manifest.get("factory_kwargs", {}))
    apply_structure(model, manifest.get("structure", {}))
    model = _to_device(model, device)
    for record in manifest.get("quantization", []):
        try:
            quantize.apply_quantization(model, record["scheme"], modules=tuple(record["modules"]))
        except quantize.QuantizationError as exc:
            raise ArtifactError(f"quantization {record['scheme']!r} cannot be rebuilt here: {exc}") from exc
    apply_plain_state(model, tensors, manifest.get("tensors", {}))
    model.eval()
    return model


class CompiledModule:
    """Callable wrapper of an AOTInductor runner with the bits of the nn.Module API callers use."""

    def __init__(self, runner: Any, path: Path) -> None:
        self.runner = runner
        self.path = path
        self.training = False

    def __call__(self, *inputs: Any) -> Any:
        out = self.runner(*inputs)
        return out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out

    def eval(self) -> CompiledModule:
        return self

    def parameters(self) -> Iterator[Any]:
        return iter(())

    def to(self, device: str) -> CompiledModule:
        return self


def assess_compiled(
    manifest: Mapping[str, Any],
    *,
    device: str,
    torch_version: str,
    dtype: str = "float32",
    compile_model: bool = False,
    max_batch_size: int = 1,
) -> str | None:
    """Why the artifact's AOTInductor package cannot serve this configuration, or None when it can (pure).

    The package is native code for one device kind, built by one torch version, with float32 weights frozen into
    the graph and batch sizes 1..its maxBatchSize."""
    entry = manifest.get("compiled")
    if not entry:
        return f"model {manifest.get('name')!r} has no compiled package (compress with compiled.aotInductor)"
    if entry.get("device") != device.split(":")[0]:
        return f"compiled package is for device {entry.get('device')!r}, not {device!r}"
    if entry.get("torch") != torch_version:
        return (f"compiled package was built by torch {entry.get('torch')}, this is torch {torch_version}; "
                "load the eager model or recompress")
    if dtype != "float32":
        return f"compiled package computes in float32, not {dtype}"
    if compile_model:
        return "compiled package is already compiled (--compile asks for torch.compile of the eager model)"
    package_max = entry.get("maxBatchSize")
    if isinstance(package_max, int) and max_batch_size > package_max:
        return f"compiled package takes batches up to {package_max}, the server's max batch size is {max_batch_size}"
    return None


def load_compiled_module(manifest: Mapping[str, Any], directory: Path, *, device: str = "cpu") -> CompiledModule:
    """Load the artifact's AOTInductor package (native code; the manifest digest was verified by the caller)."""
    import torch

    problem = assess_compiled(manifest, device=device, torch_version=torch.__version__)
    if problem:
        raise ArtifactError(problem)
    entry = manifest["compiled"]
    try:
        runner = torch._inductor.aoti_load_package(str(directory / entry["file"]))
    except Exception as exc:
        raise ArtifactError(f"compiled package {entry['file']}: cannot be loaded: {exc}") from exc
    return CompiledModule(runner, directory / entry["file"])


def build_dynamic_shapes(specs: Sequence[TensorSpec], max_batch: int) -> tuple[dict[int, Any], ...]:
    """torch.export dynamic shapes for the inputs: batch on axis 0, other -1 axes inferred (Dim.AUTO). Pure."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=max_batch)
    shapes = []
    for spec in specs:
        dims: dict[int, Any] = {0: batch}
        for axis, size in enumerate(spec.shape[1:], start=1):
            if size == -1:
                dims[axis] = torch.export.Dim.AUTO  # range and sharing inferred from the model (e.g. <= 512 tokens)
        shapes.append(dims)
    return tuple(shapes)


def write_compiled_package(
    directory: Path,
    module: Any,
    example_inputs: Sequence[Any],
    specs: Sequence[TensorSpec],
    *,
    max_batch: int,
    max_autotune: bool = False,
) -> dict[str, Any]:
    """Export `module` and compile it with AOTInductor into `model.cpu.pt2`; returns the manifest entry.

    `max_autotune` lets Inductor benchmark its C++ GEMM templates (AMX/VNNI int8 kernels) against ATen's on
    this machine and keep the fastest: a longer build, tuned to the build machine's CPU.
    """
    import torch

    name = "model.cpu.pt2"
    options: dict[str, Any] = {"freezing": True}
    if max_autotune:
        options.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    try:
        # freezing: weights become constants of the compiled graph, so that transposes, dequantized copies and
        # layouts are folded at build time instead of being recomputed on every call.
        with torch.no_grad(), torch._inductor.config.patch(**options):
            program = torch.export.export(
                module, tuple(example_inputs), dynamic_shapes=build_dynamic_shapes(specs, max_batch)
            )
            torch._inductor.aoti_compile_and_package(program, package_path=str(directory / name))
    except Exception as exc:
        raise ArtifactError(
            f"AOTInductor compilation failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    return {
        "file": name,
        "format": COMPILED_FORMAT,
        "device": "cpu",
        "torch": torch.__version__,
        "maxBatchSize": max_batch,
        "maxAutotune": max_autotune,
    }


def _to_device(module: Any, device: str) -> Any:
    if device == "cpu":
        return module
    try:
        return module.to(device)
    except Exception as exc:
        raise ArtifactError(f"model cannot be moved to device {device!r}: {exc}") from exc


def assess_export_archive(path: Path) -> None:
    """Refuse a `.pt2` archive holding anything `torch.load(weights_only=True)` would not load."""
    import torch

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArtifactError(f"program {path.name}: not a torch.export archive: {exc}") from exc
    with archive:
        names = archive.namelist()
        if not any(n.endswith("/models/model.json") for n in names) or not any(
            n.endswith("archive_format") for n in names
        ):
            raise ArtifactError(f"program {path.name}: not a torch.export archive (no models/model.json)")
        for name in names:
            if name.endswith((".so", ".dll", ".dylib", ".cpp")):
                raise ArtifactError(f"program {path.name}: refused: contains native code ({name})")
            blob = archive.read(name)
            if blob[:4] == _ZIP_MAGIC or (blob[:1] and blob[0] == _PICKLE_PROTOCOL_BYTE) or name.endswith(".pkl"):
                try:
                    torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
                except Exception as exc:
                    raise ArtifactError(
                        f"program {path.name}: refused: {name} is a pickle that torch.load(weights_only=True) "
                        f"rejects ({str(exc).splitlines()[0]})"
                    ) from exc


def load_exported_module(path: Path) -> Any:
    """Load a `torch.export` program after checking its archive; returns its callable module."""
    import torch

    if not path.is_file():
        raise ArtifactError(f"program file {path.name} is missing from {path.parent}")
    assess_export_archive(path)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ArtifactError(f"program {path.name}: torch.export.load failed: {exc}") from exc
    return program.module()


# ----------------------------------------------------------------------------------------------------------
# Saving.


@contextlib.contextmanager
def stage_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory of `path`; on success it is renamed to `path`, on error removed.

    Nothing is ever visible under `path` until everything inside was written and fsynced.
    """
    final = Path(path).resolve()
    if final.exists() and not overwrite:
        raise ArtifactError(f"output directory {final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        for child in staging.iterdir():
            _fsync_path(child)
        _fsync_path(staging)
        if final.exists():
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(final, trash)
            os.rename(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, final)
        _fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_model_files(
    directory: Path,
    module: Any,
    *,
    name: str,
    factory: str,
    inputs: Sequence[TensorSpec | Mapping[str, Any]],
    outputs: Sequence[TensorSpec | Mapping[str, Any]],
    factory_kwargs: Mapping[str, Any] | None = None,
    encoding: str = "safetensors",
    quantization: Sequence[Any] = (),
    metadata: Mapping[str, Any] | None = None,
    zstd_level: int | None = None,
    compile_inputs: Sequence[Any] | None = None,
    compile_max_batch: int = 1024,
    compile_max_autotune: bool = False,
) -> dict[str, Any]:
    """Write a factory-kind model (weights + manifest) into an existing directory; returns the manifest.

    With `compile_inputs` (example input tensors) an AOTInductor package of `module` is added (`compiled`).

    `structure` is derived by comparing `module` with a fresh factory build; `quantization` lists what was
    quantized (QuantizationRecord or {scheme, modules}) so that the loader can rebuild the layouts.
    """
    import torch

    kwargs = dict(factory_kwargs or {})
    with torch.device("meta"):
        reference = build_factory_module(factory, kwargs)
    structure = build_structure_diff(reference, module)
    records = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in quantization]
    tensors, layouts = build_plain_state(module)
    weights_name = "weights.safetensors" + (".zst" if encoding == "safetensors+zstd" else "")
    blob = build_encoded_weights(tensors, encoding, zstd_level=zstd_level)
    (directory / weights_name).write_bytes(blob)
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "name": name,
        "kind": "factory",
        "factory": factory,
        "factory_kwargs": kwargs,
        "weights": weights_name,
        "encoding": encoding,
        "inputs": [s.to_dict() for s in build_tensor_specs(list(inputs), "inputs")],
        "outputs": [s.to_dict() for s in build_tensor_specs(list(outputs), "outputs")],
        "structure": structure,
        "quantization": records,
        "tensors": layouts,
        "files": {weights_name: {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}},
        "metadata": dict(metadata or {}),
    }
    if compile_inputs is not None:
        specs = build_tensor_specs(list(inputs), "inputs")
        entry = write_compiled_package(
            directory, module, compile_inputs, specs, max_batch=compile_max_batch, max_autotune=compile_max_autotune
        )
        sha, size = _sha256_file(directory / entry["file"])
        manifest["files"][entry["file"]] = {"sha256": sha, "bytes": size}
        manifest["compiled"] = entry
    return _finish_manifest(directory, manifest)


def write_export_files(
    directory: Path,
    program: Any,
    *,
    name: str,
    inputs: Sequence[TensorSpec | Mapping[str, Any]],
    outputs: Sequence[TensorSpec | Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an export-kind model (a `torch.export.ExportedProgram`) into an existing directory."""
    import torch

    program_name = "program.pt2"
    torch.export.save(program, str(directory / program_name))
    sha, size = _sha256_file(directory / program_name)
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "name": name,
        "kind": "export",
        "weights": program_name,
        "inputs": [s.to_dict() for s in build_tensor_specs(list(inputs), "inputs")],
        "outputs": [s.to_dict() for s in build_tensor_specs(list(outputs), "outputs")],
        "files": {program_name: {"sha256": sha, "bytes": size}},
        "metadata": dict(metadata or {}),
    }
    return _finish_manifest(directory, manifest)


def _finish_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    problems = assess_manifest(manifest)
    if problems:
        raise ArtifactError("manifest: " + "; ".join(problems))
    manifest["digest"] = build_digest(manifest)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def save_model(
    module: Any,
    path: str | os.PathLike[str],
    *,
    name: str,
    factory: str,
    inputs: Sequence[TensorSpec | Mapping[str, Any]],
    outputs: Sequence[TensorSpec | Mapping[str, Any]],
    factory_kwargs: Mapping[str, Any] | None = None,
    encoding: str = "safetensors",
    quantization: Sequence[Any] = (),
    metadata: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Atomically write a factory-kind model directory at `path`; returns the manifest (with `digest`).

    `extra_files` (e.g. a report) are written alongside, inside the same atomic rename, and are not part of
    the digest.
    """
    with stage_directory(path, overwrite=overwrite) as staging:
        manifest = write_model_files(
            staging,
            module,
            name=name,
            factory=factory,
            inputs=inputs,
            outputs=outputs,
            factory_kwargs=factory_kwargs,
            encoding=encoding,
            quantization=quantization,
            metadata=metadata,
        )
        for file_name, blob in (extra_files or {}).items():
            if not _is_plain_file_name(file_name) or file_name in manifest["files"]:
                raise ArtifactError(f"extra file {file_name!r}: not a free file name inside the model directory")
            (staging / file_name).write_bytes(blob)
    return manifest


def save_exported_model(
    program: Any,
    path: str | os.PathLike[str],
    *,
    name: str,
    inputs: Sequence[TensorSpec | Mapping[str, Any]],
    outputs: Sequence[TensorSpec | Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Atomically write an export-kind model directory at `path`; returns the manifest."""
    with stage_directory(path, overwrite=overwrite) as staging:
        return write_export_files(staging, program, name=name, inputs=inputs, outputs=outputs, metadata=metadata)


def build_weights_bytes(manifest: Mapping[str, Any]) -> int:
    """Bytes of the model's weights (or program) file alone: what the compression shrinks, counted as the Deep
    Compression paper counts (weights only). Pure.

    The manifest is excluded (`fetch_loaded_bytes` adds it); the optional compiled package is a second copy of the
    model plus native code and is counted apart (`build_compiled_bytes`).
    """
    files = manifest.get("files", {})
    return int(files[manifest["weights"]]["bytes"]) if manifest.get("weights") in files else 0


def build_directory_bytes(manifest: Mapping[str, Any]) -> int:
    """The weights file's bytes: the same as `build_weights_bytes`, under the older name (which suggests the whole
    directory, but never counted the manifest). Pure."""
    return build_weights_bytes(manifest)


def fetch_loaded_bytes(directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> int:
    """Bytes the server reads to load the model (without the compiled package): the manifest file plus the weights
    file. Reads the manifest's size from `directory`."""
    return (Path(directory) / MANIFEST_FILE).stat().st_size + build_weights_bytes(manifest)


def build_compiled_bytes(manifest: Mapping[str, Any]) -> int:
    """Bytes of the optional AOTInductor package (0 when absent). Pure."""
    entry = manifest.get("compiled")
    return int(manifest["files"][entry["file"]]["bytes"]) if entry else 0
