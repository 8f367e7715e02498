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
artifact, the form (eager or compiled) the compression Job measured faster, per device kind, with its figures;
`tokenizer` the optional text interface (`TokenizerSpec`): a tokenizer file in the directory (listed in `files`, so
the digest covers it) with which the server turns a BYTES text input into the model's token-id inputs.

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


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """The manifest's `tokenizer`: the model takes text through a tokenizer the server applies before batching::

        "tokenizer": {"file": "tokenizer.json", "text": "text", "maxLength": 256,
                      "inputs": {"ids": "input_ids", "mask": "attention_mask", "typeIds": "token_type_ids"}}

    `file`: a Hugging Face `tokenizers` JSON file in the model directory (listed in `files`); `text`: the name of the
    BYTES input (shape [-1], one UTF-8 string per row) the server adds to the model's metadata, beside the token-id
    inputs; `maxLength`: tokens per text at most (longer texts are truncated); `inputs`: which declared inputs take
    the token ids (required), the attention mask (optional) and the token type ids (optional), each an integer
    input of shape [-1, -1]; `padId` (optional, default 0): the id padding uses.
    """

    file: str
    text: str
    max_length: int
    ids: str
    mask: str | None = None
    type_ids: str | None = None
    pad_id: int = 0

    @property
    def fed_inputs(self) -> tuple[str, ...]:
        """The declared inputs the tokenizer fills (ids, then mask and type ids when declared)."""
        return tuple(name for name in (self.ids, self.mask, self.type_ids) if name is not None)

    def to_dict(self) -> dict[str, Any]:
        inputs = {"ids": self.ids}
        if self.mask is not None:
            inputs["mask"] = self.mask
        if self.type_ids is not None:
            inputs["typeIds"] = self.type_ids
        return {"file": self.file, "text": self.text, "maxLength": self.max_length, "inputs": inputs,
                "padId": self.pad_id}


TOKENIZER_ROLES = {"ids": "ids", "mask": "mask", "typeIds": "type_ids"}
TOKEN_DATATYPES = ("INT32", "INT64")
MAX_TOKENIZER_LENGTH = 1 << 16


def build_tokenizer_spec(raw: Any, inputs: Sequence[TensorSpec]) -> TokenizerSpec | None:
    """Parse the manifest's `tokenizer` against the declared inputs (None when absent); raises ArtifactError naming
    the field. Pure."""
    if raw is None:
        return None
    where = "tokenizer"
    if not isinstance(raw, Mapping):
        raise ArtifactError(f"{where}: must be {{file, text, maxLength, inputs: {{ids, mask?, typeIds?}}}}")
    unknown = sorted(set(raw) - {"file", "text", "maxLength", "inputs", "padId"})
    if unknown:
        raise ArtifactError(f"{where}: unknown field(s) {unknown}")
    file = raw.get("file")
    if not isinstance(file, str) or not is_plain_file_name(file):
        raise ArtifactError(f"{where}.file: must be a file name inside the model directory, got {file!r}")
    text = raw.get("text", "text")
    if not isinstance(text, str) or not text:
        raise ArtifactError(f"{where}.text: must be a non-empty input name, got {text!r}")
    max_length = raw.get("maxLength")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 <= max_length <= MAX_TOKENIZER_LENGTH:
        raise ArtifactError(
            f"{where}.maxLength: must be an integer within 2..{MAX_TOKENIZER_LENGTH}, got {max_length!r}"
        )
    pad_id = raw.get("padId", 0)
    if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
        raise ArtifactError(f"{where}.padId: must be a non-negative integer, got {pad_id!r}")
    fed = raw.get("inputs")
    if not isinstance(fed, Mapping) or "ids" not in fed:
        raise ArtifactError(f"{where}.inputs: must be {{ids: <input>, mask?: <input>, typeIds?: <input>}}")
    unknown = sorted(set(fed) - set(TOKENIZER_ROLES))
    if unknown:
        raise ArtifactError(f"{where}.inputs: unknown role(s) {unknown}; roles are {', '.join(TOKENIZER_ROLES)}")
    by_name = {spec.name: spec for spec in inputs}
    names: dict[str, str] = {}
    for role, name in fed.items():
        spec = by_name.get(name) if isinstance(name, str) else None
        if spec is None:
            raise ArtifactError(f"{where}.inputs.{role}: {name!r} is not one of the declared inputs {list(by_name)}")
        if spec.datatype not in TOKEN_DATATYPES or len(spec.shape) != 2 or spec.shape[0] != -1:
            raise ArtifactError(
                f"{where}.inputs.{role}: input {name!r} must be INT32 or INT64 of shape [-1, -1] or [-1, N], got "
                f"{spec.datatype} {list(spec.shape)}"
            )
        if name in names.values():
            raise ArtifactError(f"{where}.inputs: input {name!r} takes two roles")
        names[TOKENIZER_ROLES[role]] = name
    if text in by_name:
        raise ArtifactError(f"{where}.text: {text!r} is already a declared input; name the text input apart")
    return TokenizerSpec(file=file, text=text, max_length=max_length, pad_id=pad_id, **names)


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
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None:
        try:
            spec = build_tokenizer_spec(tokenizer, build_tensor_specs(manifest.get("inputs"), "inputs"))
        except ArtifactError as exc:
            problems.append(str(exc))
        else:
            if spec is not None and isinstance(manifest.get("files"), Mapping) and spec.file not in manifest["files"]:
                problems.append(f"files: does not list the tokenizer file {spec.file!r}")
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
        tokenizer = manifest.get("tokenizer")
        for name in [manifest["weights"], *([tokenizer["file"]] if tokenizer else [])]:
            file_path = directory / name
            if not file_path.is_file():
                what = "weights" if name == manifest["weights"] else "tokenizer"
                raise ArtifactError(f"{what} file {name} is missing from {directory}")
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

