"""The model as a torch.export program: the export kind's archive, and the optional AOTInductor package.

Reads, writes and compiles files; loads native code only on explicit request. Both are `.pt2` zip archives made
from a `torch.export` program:

- Export kind: the manifest's `weights` names a `torch.export.save` archive. Every pickle inside it is checked
  with `torch.load(weights_only=True)` and native code is refused before `torch.export.load` runs
  (`assess_export_archive`), because `torch.export.load` itself falls back to full unpickling.
- Compiled package: a factory-kind artifact may also carry an AOTInductor package of the same model for fast
  CPU serving: `"compiled": {"file": "model.cpu.pt2", "format": "aotinductor", "device": "cpu", "torch":
  "<version that compiled it>", "maxBatchSize": 1024}`, listed in `files` (so covered by the digest). It is
  native code (a shared library inside the zip): `store.load_model(..., compiled=True)` loads it only on
  explicit request, after the digest check, and only with the torch version that built it; by default the eager
  module is built from the weights. Which of the two forms serves is measured, not assumed (torchao's int8 layers
  are slower than fp32 in eager mode on small models, faster compiled; elsewhere eager may win): the compression
  Job times both and records the faster per device kind in the manifest's `fastest` (`build_fastest_form`, pure),
  and the inference server serves that form when the package fits its configuration (`serve --compiled`,
  `assess_compiled`, `server.loading.plan_served_form`). Shapes: the first dimension of every input is the batch
  (1..maxBatchSize); any other -1 dimension is dynamic too, with the range torch.export infers from the model
  (e.g. at most 512 tokens).
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from shipyard.runtime.artifacts import ArtifactError, manifests, weights

COMPILED_FILE = "model.cpu.pt2"
FORM_EAGER = "eager"
FORM_COMPILED = "compiled"


def build_fastest_form(
    eager_p50_ms: Mapping[int, float], compiled_p50_ms: Mapping[int, float] | None, *, unavailable: str | None = None
) -> dict[str, Any]:
    """Which form of a compressed model serves faster, from p50 latencies per batch size measured in the same
    interleaved rounds, with why (pure): `{form, why, p50Ms: {eager: {batch1: ms, ...}, compiled: {...}}, ratio}`.

    The package wins when its p50s, averaged geometrically over the batch sizes measured for both forms, are below
    the eager model's (one number for every batch size: a form that is 5x faster at batch 1 and 1.1x slower at
    batch 64 wins; a tie leaves the eager model, which needs no native code). Without a package (`compiled_p50_ms`
    None), the eager model, because of `unavailable`. Keys are strings (`batch1`), as JSON and the digest keep them.
    """
    eager = {int(b): float(v) for b, v in eager_p50_ms.items()}
    figures = {FORM_EAGER: _batch_keys(eager)}
    if not compiled_p50_ms:
        return {"form": FORM_EAGER, "why": unavailable or "no compiled package", "p50Ms": figures}
    compiled = {int(b): float(v) for b, v in compiled_p50_ms.items()}
    figures[FORM_COMPILED] = _batch_keys(compiled)
    common = sorted(b for b in eager if b in compiled and eager[b] > 0 and compiled[b] > 0)
    if not common:
        return {"form": FORM_EAGER, "why": "no batch size measured for both forms", "p50Ms": figures}
    ratio = math.exp(sum(math.log(compiled[b] / eager[b]) for b in common) / len(common))
    detail = ", ".join(f"batch {b} {compiled[b]:.4g} vs {eager[b]:.4g} ms" for b in common)
    if ratio < 1:
        why = f"package faster than eager: {detail} (p50 ratio {ratio:.3g}, geometric mean)"
        return {"form": FORM_COMPILED, "why": why, "p50Ms": figures, "ratio": ratio}
    why = f"eager not slower than the package: {detail} (p50 ratio {ratio:.3g}, geometric mean)"
    return {"form": FORM_EAGER, "why": why, "p50Ms": figures, "ratio": ratio}


def _batch_keys(values: Mapping[int, float]) -> dict[str, float]:
    return {f"batch{b}": v for b, v in sorted(values.items())}


class CompiledModule:
    """Callable wrapper of an AOTInductor package with the bits of the nn.Module API callers use.

    Calls the package's loader directly with the flat input list: `AOTICompiledModel.__call__` parses the call's
    pytree specs from JSON on every call (~20 us on a 2-core Xeon, twice the whole forward pass of the int8 digits
    MLP at batch 1). The specs are read once here instead; inputs are positional tensors (the manifest's inputs in
    order), so the flat list is the inputs themselves.
    """

    def __init__(self, runner: Any, path: Path) -> None:
        from torch.utils import _pytree

        self.runner = runner
        self.path = path
        self.training = False
        self.loader = runner.loader
        in_spec, out_spec = (_pytree.treespec_loads(s) for s in self.loader.get_call_spec())
        self.input_count = in_spec.num_leaves
        self.out_spec = out_spec

    def __call__(self, *inputs: Any) -> Any:
        if len(inputs) != self.input_count:
            raise ValueError(f"compiled package takes {self.input_count} input tensor(s), got {len(inputs)}")
        out = self.loader.run([x.contiguous() for x in inputs])
        return out[0] if len(out) == 1 else tuple(out)

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


def build_dynamic_shapes(specs: Sequence[manifests.TensorSpec], max_batch: int) -> tuple[dict[int, Any], ...]:
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
    specs: Sequence[manifests.TensorSpec],
    *,
    max_batch: int,
    max_autotune: bool = False,
) -> dict[str, Any]:
    """Export `module` and compile it with AOTInductor into `model.cpu.pt2`; returns the manifest entry.

    `max_autotune` lets Inductor benchmark its C++ GEMM templates (AMX/VNNI int8 kernels) against ATen's on
    this machine and keep the fastest: a longer build, tuned to the build machine's CPU.
    """
    import torch

    name = COMPILED_FILE
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
        "format": manifests.COMPILED_FORMAT,
        "device": "cpu",
        "torch": torch.__version__,
        "maxBatchSize": max_batch,
        "maxAutotune": max_autotune,
    }


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
            if weights.is_pickled(blob) or name.endswith(".pkl"):
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

