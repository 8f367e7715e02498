"""The weights file of a factory-kind model: plain tensors, and the encodings they are stored in.

Pure (bytes in, tensors out) apart from `load_weight_tensors`, which reads the file; never unpickles anything
beyond plain tensors. Encodings (the manifest's `encoding`): a safetensors file (`safetensors`), the same
zstd-compressed (`safetensors+zstd`, so that pruned weights show in bytes), or a plain state_dict written by
`torch.save` (`torch-state-dict`), read with `torch.load(weights_only=True)` only; a pickle where safetensors is
declared is refused.

Quantized weights are torchao tensor subclasses: they are stored as their plain inner tensors (`<param>::qdata`
int8, `<param>::scale` fp32, ...), and the manifest's `tensors` records the subclass type and inner tensor names of
each such parameter, checked on load. The loader re-applies the same torchao scheme to those modules (which fixes
the layout: block sizes, dtypes) and then overwrites every inner tensor with the stored bytes
(`apply_plain_state`), so the stored int8 data is exactly what runs.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shipyard.runtime.artifacts import ArtifactError

INNER_SEPARATOR = "::"
_PICKLE_PROTOCOL_BYTE = 0x80
_ZIP_MAGIC = b"PK\x03\x04"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


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


def is_pickled(data: bytes) -> bool:
    """Whether `data` is what `torch.save` writes (a zip) or a raw pickle: never to be loaded as anything but
    `torch.load(weights_only=True)`. Pure."""
    return data[:4] == _ZIP_MAGIC or (data[:1] != b"" and data[0] == _PICKLE_PROTOCOL_BYTE)


def load_weight_tensors(path: Path, encoding: str, *, expected_sha256: str | None = None) -> dict[str, Any]:
    """Read a weights file into plain tensors without unpickling anything beyond plain tensors.

    With `expected_sha256`, the bytes actually read are checked (not only the file as hashed earlier).
    """
    import torch

    data = _read_bytes(path)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ArtifactError(f"digest mismatch: weights {path.name} changed while being loaded")
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
        if data[:4] != _ZSTD_MAGIC:
            raise ArtifactError(f"weights {path.name}: encoding is safetensors+zstd but the file is not zstd data")
        data = _zstd_decompress(data, path)
    if is_pickled(data):
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

