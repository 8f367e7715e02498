"""The manifest of a model directory (`shipyard-model.json`): schema, tensor specs, digest, reading and verifying.

Pure (validation, specs, digest) apart from `load_manifest` / `load_verified_manifest` / `fetch_file_sha256`,
which read the directory (the manifest, and every file it lists to hash it). Never imports torch.

A model directory (a source model shipped in an image, and a compression output alike) holds the manifest::

      {"format": 1, "name": "digits", "kind": "factory",
       "factory": "pkg.module:function", "factory_kwargs": {...},
       "weights": "weights.safetensors", "encoding": "safetensors",
       "inputs":  [{"name": "input",  "datatype": "FP32", "shape": [-1, 64]}],
       "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
       "structure": {}, "quantization": [], "tensors": {},
       "files": {"weights.safetensors": {"sha256": "<hex>", "bytes": 1234}},
       "metadata": {}, "digest": "sha256:<hex>"}

and the weights file named by `weights`. Kinds (the model contract, docs/model-contract.md): `factory`, a Python
factory `module:function` building the `nn.Module` whose weights the weights file holds (`eager`, `weights`), and
`export`, a `torch.export` program (`programs`). `structure` records the layers structured pruning resized
(`eager`); `quantization` the torchao scheme re-applied on load and `tensors` the subclass layouts of quantized
parameters (`weights`); `compiled` the optional AOTInductor package (`programs`); `fastest`, in a compressed
artifact, the form (eager or compiled) the compression Job measured faster, per device kind, with its figures.

Digest. `files` holds the sha256 and size of every file the model is made of, and `digest` is the sha256 of
the canonical JSON of the manifest without `digest` (sorted keys, no spaces): it covers the weights through
`files` and everything that decides how they are interpreted. A hand-written source manifest may omit
`files` and `digest`: the loader then computes them (and `LoadedModel.digest` is that computed value).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shipyard.runtime.artifacts import ArtifactError

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
RESIZABLE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Embedding")
COMPILED_FORMAT = "aotinductor"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model, in Open Inference Protocol terms (-1 = variable dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


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


FORMS = ("eager", "compiled")


def _assess_fastest(fastest: Any, *, has_compiled: bool) -> list[str]:
    """`fastest`: per device kind, the form the compression Job measured faster ({form, why, p50Ms, ...})."""
    if fastest is None:
        return []
    if not isinstance(fastest, Mapping):
        return ["fastest: must be an object of device -> {form, why}"]
    problems = []
    for device, entry in fastest.items():
        if not isinstance(entry, Mapping) or entry.get("form") not in FORMS:
            problems.append(f"fastest[{device!r}]: must be {{form: eager | compiled, why: <text>}}")
        elif entry["form"] == "compiled" and not has_compiled:
            problems.append(f"fastest[{device!r}]: names the compiled form, and the model has no compiled package")
    return problems


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
    if not isinstance(weights, str) or not is_plain_file_name(weights):
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
            or not is_plain_file_name(compiled.get("file"))
        ):
            problems.append(f"compiled: must be {{format: {COMPILED_FORMAT}, file: <name>, device, torch}}")
        elif isinstance(manifest.get("files"), Mapping) and compiled["file"] not in manifest["files"]:
            problems.append(f"files: does not list the compiled package {compiled['file']!r}")
    problems += _assess_fastest(manifest.get("fastest"), has_compiled=compiled is not None)
    problems += _assess_quantization(manifest.get("quantization", []))
    files = manifest.get("files")
    if files is not None:
        if not isinstance(files, Mapping):
            problems.append("files: must be an object of file name -> {sha256, bytes}")
        else:
            for name, entry in files.items():
                if not is_plain_file_name(name):
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


def is_plain_file_name(name: Any) -> bool:
    """Whether `name` names a file directly inside a model directory, other than the manifest. Pure."""
    return (
        isinstance(name, str)
        and bool(name)
        and name not in {".", ".."}
        and "/" not in name
        and "\\" not in name
        and name != MANIFEST_FILE
    )


def fetch_file_sha256(path: Path) -> tuple[str, int]:
    """The sha256 (hex) and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


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
            sha, size = fetch_file_sha256(file_path)
            files[name] = {"sha256": sha, "bytes": size}
        manifest["files"] = files
    else:
        for name, entry in files.items():
            file_path = directory / name
            if not file_path.is_file():
                raise ArtifactError(f"file {name} listed in the manifest is missing from {directory}")
            sha, size = fetch_file_sha256(file_path)
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

