"""Model directories on disk: writing them atomically, loading them, and what they weigh.

Reads and writes files. The one module that knows how a model directory's parts fit together: the manifest
(`manifests`), the weights file (`weights`), the factory's module (`eager`) and the torch.export programs
(`programs`). `load_model` verifies the digest before anything in the directory is interpreted.

Writes are atomic: everything is written into a temporary sibling directory which is renamed into place, so
a partial artifact is never visible under the final name (`stage_directory`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from shipyard.runtime.artifacts import ArtifactError, eager, manifests, programs, weights


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: `module(*tensors)` takes tensors in the order of `inputs`."""

    module: Any  # torch.nn.Module, in eval mode
    manifest: dict[str, Any]
    inputs: tuple[manifests.TensorSpec, ...]
    outputs: tuple[manifests.TensorSpec, ...]
    digest: str
    path: Path

    @property
    def name(self) -> str:
        return str(self.manifest["name"])


# ----------------------------------------------------------------------------------------------------------
# Writing.


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
    inputs: Sequence[manifests.TensorSpec | Mapping[str, Any]],
    outputs: Sequence[manifests.TensorSpec | Mapping[str, Any]],
    factory_kwargs: Mapping[str, Any] | None = None,
    encoding: str = "safetensors",
    quantization: Sequence[Any] = (),
    metadata: Mapping[str, Any] | None = None,
    zstd_level: int | None = None,
    compile_inputs: Sequence[Any] | None = None,
    compile_max_batch: int = 1024,
    compile_max_autotune: bool = False,
    tokenizer: Mapping[str, Any] | None = None,
    tokenizer_source: Path | None = None,
) -> dict[str, Any]:
    """Write a factory-kind model (weights + manifest) into an existing directory; returns the manifest.

    `tokenizer` (the manifest's declaration, `manifests.TokenizerSpec`) with `tokenizer_source` (the tokenizer file
    to copy in under the declared name) makes a model that takes text; the file is listed in `files`.

    With `compile_inputs` (example input tensors) an AOTInductor package of `module` is added (`compiled`).

    `structure` is derived by comparing `module` with a fresh factory build; `quantization` lists what was
    quantized (QuantizationRecord or {scheme, modules}) so that the loader can rebuild the layouts.
    """
    import torch

    kwargs = dict(factory_kwargs or {})
    with torch.device("meta"):
        reference = eager.build_factory_module(factory, kwargs)
    structure = eager.build_structure_diff(reference, module)
    records = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in quantization]
    tensors, layouts = weights.build_plain_state(module)
    weights_name = "weights.safetensors" + (".zst" if encoding == "safetensors+zstd" else "")
    blob = weights.build_encoded_weights(tensors, encoding, zstd_level=zstd_level)
    (directory / weights_name).write_bytes(blob)
    manifest: dict[str, Any] = {
        "format": manifests.FORMAT_VERSION,
        "name": name,
        "kind": "factory",
        "factory": factory,
        "factory_kwargs": kwargs,
        "weights": weights_name,
        "encoding": encoding,
        "inputs": [s.to_dict() for s in manifests.build_tensor_specs(list(inputs), "inputs")],
        "outputs": [s.to_dict() for s in manifests.build_tensor_specs(list(outputs), "outputs")],
        "structure": structure,
        "quantization": records,
        "tensors": layouts,
        "files": {weights_name: {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}},
        "metadata": dict(metadata or {}),
    }
    if tokenizer is not None:
        manifest.update(write_tokenizer_file(directory, tokenizer, tokenizer_source, manifest["inputs"],
                                             manifest["files"]))
    manifest = _finish_manifest(directory, manifest)
    if compile_inputs is not None:
        manifest = add_compiled_package(directory, manifest, module, compile_inputs, max_batch=compile_max_batch,
                                        max_autotune=compile_max_autotune)
    return manifest


def write_tokenizer_file(
    directory: Path, tokenizer: Mapping[str, Any], source: Path | None, inputs: Sequence[Any],
    files: Mapping[str, Any],
) -> dict[str, Any]:
    """Copy the tokenizer file into `directory` under its declared name; returns the manifest fields to update
    (`tokenizer`, normalised with its defaults written out, and `files` with the file). Raises ArtifactError for a
    declaration that does not fit the inputs or a missing source file."""
    spec = manifests.build_tokenizer_spec(tokenizer, manifests.build_tensor_specs(list(inputs), "inputs"))
    assert spec is not None
    if source is None or not Path(source).is_file():
        raise ArtifactError(f"tokenizer file {source} (for {spec.file!r}) is missing")
    if spec.file in files:
        raise ArtifactError(f"tokenizer.file {spec.file!r} clashes with another file of the model directory")
    shutil.copyfile(source, directory / spec.file)
    sha, size = manifests.fetch_file_sha256(directory / spec.file)
    return {"tokenizer": spec.to_dict(), "files": {**files, spec.file: {"sha256": sha, "bytes": size}}}


def add_compiled_package(
    directory: Path,
    manifest: Mapping[str, Any],
    module: Any,
    compile_inputs: Sequence[Any],
    *,
    max_batch: int = 1024,
    max_autotune: bool = False,
) -> dict[str, Any]:
    """Compile `module` into an AOTInductor package next to the weights written in `directory` and rewrite the
    manifest with it (`compiled`, listed in `files`); returns the new manifest. Raises ArtifactError when the model
    cannot be exported or compiled (a partial package file is removed)."""
    specs = manifests.build_tensor_specs(list(manifest["inputs"]), "inputs")
    try:
        entry = programs.write_compiled_package(
            directory, module, compile_inputs, specs, max_batch=max_batch, max_autotune=max_autotune
        )
    except BaseException:
        (directory / programs.COMPILED_FILE).unlink(missing_ok=True)
        raise
    sha, size = manifests.fetch_file_sha256(directory / entry["file"])
    updated = {k: v for k, v in manifest.items() if k != "digest"}
    updated["files"] = {**manifest["files"], entry["file"]: {"sha256": sha, "bytes": size}}
    updated["compiled"] = entry
    return _finish_manifest(directory, updated)


def remove_compiled_package(directory: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Delete the AOTInductor package from `directory` and from the manifest (and any record naming it as the
    fastest form); returns the rewritten manifest."""
    entry = manifest.get("compiled")
    updated = {k: v for k, v in manifest.items() if k not in ("digest", "compiled")}
    if entry:
        (directory / entry["file"]).unlink(missing_ok=True)
        updated["files"] = {k: v for k, v in manifest["files"].items() if k != entry["file"]}
    fastest = {d: e for d, e in (manifest.get("fastest") or {}).items() if e.get("form") != "compiled"}
    updated.pop("fastest", None)
    if fastest:
        updated["fastest"] = fastest
    return _finish_manifest(directory, updated)


def record_fastest(
    directory: Path, manifest: Mapping[str, Any], device: str, entry: Mapping[str, Any]
) -> dict[str, Any]:
    """Record in the manifest the form measured fastest on `device` (a device kind: cpu, cuda) with its figures
    (`fastest[device]`, see `programs.build_fastest_form`); returns the rewritten manifest. The digest covers it, so
    the choice the server reads is the one the Job made."""
    updated = {k: v for k, v in manifest.items() if k != "digest"}
    updated["fastest"] = {**(manifest.get("fastest") or {}), device.split(":")[0]: dict(entry)}
    return _finish_manifest(directory, updated)


def write_export_files(
    directory: Path,
    program: Any,
    *,
    name: str,
    inputs: Sequence[manifests.TensorSpec | Mapping[str, Any]],
    outputs: Sequence[manifests.TensorSpec | Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write an export-kind model (a `torch.export.ExportedProgram`) into an existing directory."""
    import torch

    program_name = "program.pt2"
    torch.export.save(program, str(directory / program_name))
    sha, size = manifests.fetch_file_sha256(directory / program_name)
    manifest: dict[str, Any] = {
        "format": manifests.FORMAT_VERSION,
        "name": name,
        "kind": "export",
        "weights": program_name,
        "inputs": [s.to_dict() for s in manifests.build_tensor_specs(list(inputs), "inputs")],
        "outputs": [s.to_dict() for s in manifests.build_tensor_specs(list(outputs), "outputs")],
        "files": {program_name: {"sha256": sha, "bytes": size}},
        "metadata": dict(metadata or {}),
    }
    return _finish_manifest(directory, manifest)


def _finish_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    problems = manifests.assess_manifest(manifest)
    if problems:
        raise ArtifactError("manifest: " + "; ".join(problems))
    manifest["digest"] = manifests.build_digest(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (directory / manifests.MANIFEST_FILE).write_text(text, encoding="utf-8")
    return manifest


def save_model(
    module: Any,
    path: str | os.PathLike[str],
    *,
    name: str,
    factory: str,
    inputs: Sequence[manifests.TensorSpec | Mapping[str, Any]],
    outputs: Sequence[manifests.TensorSpec | Mapping[str, Any]],
    factory_kwargs: Mapping[str, Any] | None = None,
    encoding: str = "safetensors",
    quantization: Sequence[Any] = (),
    metadata: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    tokenizer: Mapping[str, Any] | None = None,
    tokenizer_source: Path | None = None,
) -> dict[str, Any]:
    """Atomically write a factory-kind model directory at `path`; returns the manifest (with `digest`).
    `tokenizer` + `tokenizer_source`: a model that takes text (`write_model_files`).

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
            tokenizer=tokenizer,
            tokenizer_source=tokenizer_source,
        )
        for file_name, blob in (extra_files or {}).items():
            if not manifests.is_plain_file_name(file_name) or file_name in manifest["files"]:
                raise ArtifactError(f"extra file {file_name!r}: not a free file name inside the model directory")
            (staging / file_name).write_bytes(blob)
    return manifest


def save_exported_model(
    program: Any,
    path: str | os.PathLike[str],
    *,
    name: str,
    inputs: Sequence[manifests.TensorSpec | Mapping[str, Any]],
    outputs: Sequence[manifests.TensorSpec | Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Atomically write an export-kind model directory at `path`; returns the manifest."""
    with stage_directory(path, overwrite=overwrite) as staging:
        return write_export_files(staging, program, name=name, inputs=inputs, outputs=outputs, metadata=metadata)


# ----------------------------------------------------------------------------------------------------------
# Sizes.


def build_weights_bytes(manifest: Mapping[str, Any]) -> int:
    """Bytes of the model's weights (or program) file alone: what the compression shrinks, counted as the Deep
    Compression paper counts (weights only). Pure.

    The manifest is excluded (`fetch_loaded_bytes` adds it); the optional compiled package is a second copy of the
    model plus native code and is counted apart (`build_compiled_bytes`).
    """
    files = manifest.get("files", {})
    return int(files[manifest["weights"]]["bytes"]) if manifest.get("weights") in files else 0


def fetch_loaded_bytes(directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> int:
    """Bytes the server reads to load the model (without the compiled package): the manifest file plus the weights
    file. Reads the manifest's size from `directory`."""
    return (Path(directory) / manifests.MANIFEST_FILE).stat().st_size + build_weights_bytes(manifest)


def build_compiled_bytes(manifest: Mapping[str, Any]) -> int:
    """Bytes of the optional AOTInductor package (0 when absent). Pure."""
    entry = manifest.get("compiled")
    return int(manifest["files"][entry["file"]]["bytes"]) if entry else 0


# ----------------------------------------------------------------------------------------------------------
# Loading.


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
    manifest = manifests.load_verified_manifest(directory, expected_digest=expected_digest)
    return load_model_from_manifest(manifest, directory, device=device, compiled=compiled)


def load_model_from_manifest(
    manifest: dict[str, Any], directory: Path, *, device: str = "cpu", compiled: bool = False
) -> LoadedModel:
    """`load_model` after its digest check: `manifest` must come from `load_verified_manifest(directory)`."""
    if compiled:
        module = programs.load_compiled_module(manifest, directory, device=device)
    elif manifest["kind"] == "export":
        module = _to_device(programs.load_exported_module(directory / manifest["weights"]), device)
    else:
        module = build_model_from_manifest(manifest, directory, device=device)
    return LoadedModel(
        module=module,
        manifest=manifest,
        inputs=manifests.build_tensor_specs(manifest["inputs"], "inputs"),
        outputs=manifests.build_tensor_specs(manifest["outputs"], "outputs"),
        digest=manifest["digest"],
        path=directory,
    )


def build_model_from_manifest(manifest: Mapping[str, Any], directory: Path, *, device: str = "cpu") -> Any:
    """Build a factory-kind model: factory -> resized layers -> quantized layouts -> stored tensors."""
    from shipyard.runtime import quantize

    weights_file = manifest["weights"]
    tensors = weights.load_weight_tensors(
        directory / weights_file,
        manifest.get("encoding", "safetensors"),
        expected_sha256=manifest.get("files", {}).get(weights_file, {}).get("sha256"),
    )
    model = eager.build_factory_module(manifest["factory"], manifest.get("factory_kwargs", {}))
    eager.apply_structure(model, manifest.get("structure", {}))
    model = _to_device(model, device)
    for record in manifest.get("quantization", []):
        try:
            quantize.apply_quantization(model, record["scheme"], modules=tuple(record["modules"]))
        except quantize.QuantizationError as exc:
            raise ArtifactError(f"quantization {record['scheme']!r} cannot be rebuilt here: {exc}") from exc
    weights.apply_plain_state(model, tensors, manifest.get("tensors", {}))
    model.eval()
    return model


def _to_device(module: Any, device: str) -> Any:
    if device == "cpu":
        return module
    try:
        return module.to(device)
    except Exception as exc:
        raise ArtifactError(f"model cannot be moved to device {device!r}: {exc}") from exc

