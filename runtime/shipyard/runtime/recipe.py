"""The compression config file (`shipyard-runtime compress --config FILE`): its type, parsing and validation.

The recipe part (``steps``, ``evaluation``, ``compiled``) is the ModelDeployment's ``spec.compression`` recipe: the
same types (``shipyard.contract.recipe``), so the operator, the CRD and this file cannot drift. This module adds what
only a Job needs: where to read and write, logging, encoding, latency timing. `build_config` is pure (every problem
named by its field: ``steps[1].prune.amount: Input should be less than 1, got 1.5``); `load_config_document` reads
the file. Unknown fields are refused here (a config written by hand), unlike in the ModelDeployment, whose unknown
fields the API server prunes.

    source: /models/digits                    # a model directory (shipyard-model.json + weights)
    output: /artifacts/digits-3f2a...         # the artifact directory to create (must not exist)
    name: digits                              # optional; default: the source manifest's name
    steps:                                    # applied in order, one key each
      - prune: {amount: 0.9, scope: global, fineTuneEpochs: 2, lr: 0.001, batchSize: 64}
      - prune: {amount: 0.5, scope: structured, norm: 2}
      - quantize: {scheme: int8-dynamic}  # or int8-weight-only, int8-embedding, fp8, int4-weight-only
      - distill: {student: pkg.mod:factory, studentKwargs: {}, temperature: 4, alpha: 0.5, epochs: 10,
                  lr: 0.001, batchSize: 64}
    evaluation: {dataset: builtin:digits, maxRelativeAccuracyLoss: 0.01, samples: 1000,
                 maxRelativeLoss: {nn_agreement: 0.05}}
    terminationLog: /dev/termination-log      # optional
    logDir: /artifacts/tensorboard/digits     # optional: TensorBoard event files of training losses
    encoding: auto                            # auto | safetensors | safetensors+zstd
    latency: {batchSizes: [1, 64], budgetSeconds: 1.0}
    compiled: {mode: auto, maxBatchSize: 1024, maxAutotune: false}  # the AOTInductor package: auto | on | off
    seed: 0
    overwrite: false
    reuseExisting: false                      # an existing output made by the same recipe from the same source is
                                              # verified and reused (the operator sets this: its Jobs are retried)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import Field

from shipyard import contract
from shipyard.contract import recipe as shared
from shipyard.contract import schema

ENCODINGS: Final = ("auto", "safetensors", "safetensors+zstd")
CUDA_ONLY_SCHEMES: Final = shared.CUDA_ONLY_SCHEMES
EMBEDDING_SCHEMES: Final = shared.EMBEDDING_SCHEMES
STEP_KINDS: Final = shared.STEP_KINDS


class ConfigError(ValueError):
    """The config file is invalid; `problems` lists every problem with its field path."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid compression config: " + "; ".join(self.problems))


class Latency(schema.ApiModel):
    """How the report times the models."""

    batch_sizes: Annotated[tuple[Annotated[int, Field(ge=1, le=4096)], ...], Field(min_length=1)] = (1, 64)
    """Batch sizes timed (p50 per batch size)."""
    budget_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    """Time spent timing each batch size."""


class CompressionConfig(schema.ApiModel):
    """One compression Job: the recipe (shared with the ModelDeployment) and where it reads and writes."""

    source: Annotated[str, Field(min_length=1)]
    """The source model directory."""
    output: Annotated[str, Field(min_length=1)]
    """The artifact directory to create."""
    steps: shared.Steps
    """Compression steps applied in order; each sets exactly one of prune, quantize, distill."""
    evaluation: shared.Evaluation
    """The accuracy gate."""
    name: Annotated[str, Field(min_length=1)] | None = None
    """The model's name; default: the source manifest's."""
    termination_log: Annotated[str, Field(min_length=1)] = contract.TERMINATION_LOG
    """Where the one-line summary is written (the pod's termination message)."""
    log_dir: Annotated[str, Field(min_length=1)] | None = None
    """TensorBoard event files of training losses."""
    encoding: Literal["auto", "safetensors", "safetensors+zstd"] = "auto"
    """Weights encoding; auto = zstd-compressed when pruned."""
    latency: Latency = Field(default_factory=Latency)
    """How the report times the models."""
    compiled: shared.Compiled = Field(default_factory=shared.Compiled)
    """An AOTInductor package next to the weights (CPU)."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    """Seed of every random choice (training order, initialisation)."""
    overwrite: bool = False
    """Replace an existing output directory."""
    reuse_existing: bool = False
    """Reuse an existing output made by the same recipe from the same source (verified)."""


def build_step_params(step: shared.CompressionStep) -> dict[str, Any]:
    """A step's parameters as the report and the manifest record them (camelCase, what applied). Pure."""
    if step.prune is not None:
        prune = step.prune
        params: dict[str, Any] = {"amount": prune.amount, "scope": prune.scope}
        if prune.scope == "structured":
            params["norm"] = prune.structured_norm
        params["fineTuneEpochs"] = prune.fine_tune_epochs
        if prune.fine_tune_epochs:
            params.update(lr=prune.lr, batchSize=prune.batch_size)
        return params
    if step.quantize is not None:
        return {"scheme": step.quantize.scheme}
    distill = step.distill
    assert distill is not None
    return {"student": distill.student, "studentKwargs": dict(distill.student_kwargs),
            "temperature": distill.temperature, "alpha": distill.alpha, "epochs": distill.epochs, "lr": distill.lr,
            "batchSize": distill.batch_size}


def build_recipe_fields(config: CompressionConfig) -> dict[str, Any]:
    """Every config field that changes the artifact (not where it is read or written, logged, or how it is timed),
    in the shape report.json's ``recipeDigest`` has always hashed, so that artifacts made before the types were
    shared are still recognised and reused. Pure."""

    def step_fields(step: shared.CompressionStep) -> dict[str, Any]:
        if step.prune is not None:
            p = step.prune
            return {"amount": p.amount, "scope": p.scope, "norm": p.structured_norm,
                    "fine_tune_epochs": p.fine_tune_epochs, "lr": p.lr, "batch_size": p.batch_size, "kind": "prune"}
        if step.quantize is not None:
            return {"scheme": step.quantize.scheme, "kind": "quantize"}
        d = step.distill
        assert d is not None
        return {"student": d.student, "student_kwargs": dict(d.student_kwargs), "temperature": d.temperature,
                "alpha": d.alpha, "epochs": d.epochs, "lr": d.lr, "batch_size": d.batch_size, "kind": "distill"}

    evaluation = config.evaluation
    return {
        "name": config.name,
        "steps": [step_fields(s) for s in config.steps],
        "evaluation": {"dataset": evaluation.dataset,
                       "max_relative_accuracy_loss": evaluation.max_relative_accuracy_loss,
                       "samples": evaluation.samples, "max_relative_loss": dict(evaluation.max_relative_loss)},
        "encoding": config.encoding,
        "compiled": {"aot_inductor": config.compiled.aot_inductor, "max_batch_size": config.compiled.max_batch_size,
                     "max_autotune": config.compiled.max_autotune,
                     # mode counts when set: auto (the default) hashes as configs before the field did
                     **({"mode": config.compiled.mode} if config.compiled.mode != "auto" else {})},
        "seed": config.seed,
    }


def plan_compiled_build(compiled: shared.Compiled, device: str) -> tuple[bool, str | None]:
    """Whether the Job builds the AOTInductor package, and if not, why (pure). `device` is where the Job runs the
    model: cuda after a CUDA-only scheme (fp8, int4-weight-only), else cpu. The package is CPU code of a float32
    graph, so it is built on CPU Jobs only; mode off never builds it. Mode on without a CPU Job is refused by
    `assess_device` (and by admission) before anything runs."""
    if not compiled.builds_package:
        return False, "compiled.mode off"
    if device != "cpu":
        return False, f"the Job runs the model on {device} (a CUDA-only quantization scheme); the package is CPU code"
    return True, None


def assess_device(
    steps: Sequence[shared.CompressionStep], *, cuda_available: bool, compiled: shared.Compiled | None = None
) -> list[str]:
    """Problems running `steps` on this machine (CUDA-only schemes without CUDA), and a required package (compiled
    mode on) after a CUDA-only scheme, which makes the model CUDA-only while the package is CPU code. Pure."""
    problems = [
        f"steps[{i}].quantize.scheme: {step.quantize.scheme!r} needs a CUDA GPU and none is available "
        "(on CPU use int8-dynamic or int8-weight-only, or give the Job an nvidia.com/gpu)"
        for i, step in enumerate(steps)
        if step.quantize is not None and step.quantize.needs_cuda and not cuda_available
    ]
    if compiled is not None and compiled.requires_package:
        problems += [
            f"compiled.mode: on needs a CPU package, and steps[{i}].quantize.scheme {step.quantize.scheme!r} "
            "quantizes for CUDA (use mode auto)"
            for i, step in enumerate(steps)
            if step.quantize is not None and step.quantize.needs_cuda
        ]
    return problems


def build_config(raw: Any) -> CompressionConfig:
    """Validate a parsed config document; raises ConfigError listing every problem. Pure."""
    try:
        config = schema.parse(CompressionConfig, raw, forbid_unknown=True)
    except schema.ApiError as exc:
        raise ConfigError(exc.problems) from None
    problems = shared.assess_step_order(list(config.steps))
    if problems:
        raise ConfigError(problems)
    return config


def load_config_document(path: str | Path) -> Any:
    """Read a JSON or YAML config file (YAML for .yaml/.yml, JSON otherwise); raises ConfigError."""
    import yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"config file {file}: cannot be read: {exc.strerror or exc}"]) from exc
    try:
        if file.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        return json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            [f"config file {file}: not valid {'YAML' if file.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}"]
        ) from exc
