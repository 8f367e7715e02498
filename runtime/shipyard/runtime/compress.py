"""`shipyard-runtime compress --config FILE`: the compression job (prune, quantize, distill, gate, artifact).

Does I/O: reads the config, the source model directory and the dataset; writes the artifact directory
(atomically: a temporary sibling renamed into place only when the gate accepted), `report.json` inside it,
TensorBoard event files when `logDir` is set, the one-line termination message, and the report on stdout.

Flow: load and validate the config -> load the source model (digest verified) -> load the dataset ->
evaluate the source (metrics) -> apply the steps in order -> write the candidate into a staging directory ->
build its AOTInductor package there (`compiled.mode` auto or on, on a CPU Job; the compile time is reported apart,
`durations.compile`) -> load both back from there (digest verified, exactly as the server will) -> evaluate and gate
them -> time the source, the eager model and the package side by side (interleaved rounds) and record the faster form
in the manifest (`fastest`, with the figures) -> gate: accepted = rename the staging directory to `output`;
rejected = remove it and exit 1 naming the metric.

The served form. The compressed model has to be faster than the fp32 source where it is served by default, not only
smaller: torchao's int8 layers are slower than fp32 in eager mode on small models (dispatch and per-call activation
quantization), and faster in an AOTInductor package, whose graph fuses them; on other models eager wins. So with
`compiled.mode: auto` (the default) the Job builds the package when it can (a CPU Job; a model that cannot be
exported or compiled, or a package that fails the gate, leaves the eager model, with the reason recorded), measures
both where it runs, and records the faster one per device kind (`programs.build_fastest_form`); the inference server
serves that one when it fits (`serve --compiled auto`). `on` requires and serves the package; `off` never builds it.
`latency.after`, the summary line and `compressedLatencyMs` are the served form's; `served` in the report has both
forms' figures and why.

Exit codes: 0 accepted; 1 rejected by the gate or failed (bad model, dataset, step); 2 invalid config.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shipyard import contract
from shipyard.contract import recipe as shared
from shipyard.runtime import recipe, report
from shipyard.runtime.fetch import progress

log = logging.getLogger("shipyard.runtime.compress")

EXIT_ACCEPTED = 0
EXIT_FAILED = 1
EXIT_INVALID_CONFIG = 2


SOURCE_FORM = "source"  # the fp32 source model, timed next to the compressed forms


class CompressionError(RuntimeError):
    """A step or check failed; the message is the one-line reason."""


class GateRejected(RuntimeError):
    """The candidate's quality loss exceeds the tolerance; carries the report."""

    def __init__(self, report_: dict[str, Any]) -> None:
        self.report = report_
        super().__init__(report.build_summary_line(report_))


@dataclasses.dataclass
class Candidate:
    """The model being compressed and how to rebuild it (factory, kwargs, quantization records)."""

    module: Any
    factory: str
    factory_kwargs: dict[str, Any]
    quantization: list[Any]


def apply_termination_log(path: str | None, line: str) -> None:
    """Write the one-line outcome; skipped silently when the directory does not exist (outside a pod)."""
    if not path:
        return
    target = Path(path)
    if not target.parent.is_dir():
        return
    try:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(report.build_one_line(line) + "\n")
    except OSError as exc:
        log.warning("Could not write the termination log %s: %s", target, exc)


def _count_parameters(module: Any) -> int:
    return sum(int(p.numel()) for p in module.parameters())


def _check_outputs(task: str, outputs: Any, dataset_name: str, who: str) -> None:
    if task == "classification" and outputs.dim() != 2:
        raise CompressionError(
            f"{who}: outputs of shape {tuple(outputs.shape)} are not [N, classes] logits "
            f"as the {task} dataset {dataset_name!r} needs"
        )
    if task == "binary" and outputs.numel() != outputs.shape[0]:
        raise CompressionError(
            f"{who}: outputs of shape {tuple(outputs.shape)} are not one logit per sample "
            f"as the {task} dataset {dataset_name!r} needs"
        )
    if task == "embedding" and outputs.dim() != 2:
        raise CompressionError(
            f"{who}: outputs of shape {tuple(outputs.shape)} are not [N, D] vectors "
            f"as the {task} dataset {dataset_name!r} needs"
        )


class _Writer:
    """Creates the TensorBoard writer on first use (only when a log dir is configured)."""

    def __init__(self, log_dir: str | None) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def get(self) -> Any:
        if self.log_dir and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)
            log.info("Opened TensorBoard event files in %s", self.log_dir)
        return self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _train_tensors(dataset: Any, reference: Any) -> tuple[list[Any], str]:
    if dataset.train_size == 0:
        raise CompressionError(f"dataset {dataset.name!r} has no training split; fine-tuning and distillation need one")
    if dataset.task == "embedding":
        return [*dataset.train_inputs, reference], "reference"
    return [*dataset.train_inputs, dataset.train_labels], "labels"


def apply_fine_tune(
    candidate: Candidate, dataset: Any, source: Any, step: shared.Prune, index: int, seed: int, writer: _Writer
) -> list[float]:
    """Fine-tune the (pruned) candidate on the training split with the task loss."""
    from shipyard.runtime import distill, evaluate

    reference = evaluate.query_outputs(source, dataset.train_inputs) if dataset.task == "embedding" else None
    tensors, _ = _train_tensors(dataset, reference)
    n_inputs = len(dataset.train_inputs)

    def compute_loss(batch: list[Any]) -> Any:
        outputs = candidate.module(*batch[:n_inputs])
        target = batch[n_inputs]
        if dataset.task == "embedding":
            return distill.evaluate_task_loss(dataset.task, outputs, None, target)
        return distill.evaluate_task_loss(dataset.task, outputs, target, None)

    return distill.apply_training(
        candidate.module,
        tensors,
        compute_loss,
        epochs=step.fine_tune_epochs,
        lr=step.lr,
        batch_size=step.batch_size,
        seed=seed + index,
        label=f"step{index}-prune-finetune",
        writer=writer.get(),
    )


def apply_prune_step(
    candidate: Candidate, step: shared.Prune, index: int, dataset: Any, source: Any, seed: int, writer: _Writer
) -> dict[str, Any]:
    from shipyard.runtime import evaluate, prune

    params_before = _count_parameters(candidate.module)
    details: dict[str, Any] = {}
    if step.scope == "global":
        attached = prune.apply_global_prune(candidate.module, step.amount)
        if step.fine_tune_epochs:
            details["fineTuneLosses"] = apply_fine_tune(candidate, dataset, source, step, index, seed, writer)
        prune.apply_prune_removal(attached)
        details["layers"] = len(attached)
    else:
        example = evaluate.build_batch(dataset.eval_inputs, 2)
        plans = prune.plan_structured_prune(candidate.module, example, step.amount, step.structured_norm)
        details["layers"] = prune.apply_structured_prune(candidate.module, plans)
        if step.fine_tune_epochs:
            details["fineTuneLosses"] = apply_fine_tune(candidate, dataset, source, step, index, seed, writer)
    details["sparsity"] = prune.evaluate_sparsity(candidate.module)
    details["parameters"] = [params_before, _count_parameters(candidate.module)]
    return details


def apply_quantize_step(candidate: Candidate, step: shared.Quantize) -> dict[str, Any]:
    from shipyard.runtime import quantize

    try:
        record = quantize.apply_quantization(candidate.module, step.scheme)
    except quantize.QuantizationError as exc:
        raise CompressionError(str(exc)) from exc
    candidate.quantization.append(record)
    return {"modules": list(record.modules)}


def apply_distill_step(
    candidate: Candidate, step: shared.Distill, index: int, dataset: Any, seed: int, writer: _Writer
) -> tuple[Candidate, list[float]]:
    import torch

    from shipyard.runtime import artifacts, distill, evaluate
    from shipyard.runtime.artifacts import eager

    teacher = candidate.module
    teacher_outputs = evaluate.query_outputs(teacher, dataset.train_inputs)
    torch.manual_seed(seed + index)
    try:
        student = eager.build_factory_module(step.student, step.student_kwargs)
    except artifacts.ArtifactError as exc:
        raise CompressionError(f"distill student: {exc}") from exc
    sample = evaluate.query_outputs(student.eval(), evaluate.build_batch(dataset.train_inputs, 2))
    if tuple(sample.shape[1:]) != tuple(teacher_outputs.shape[1:]):
        raise CompressionError(
            f"distill student {step.student!r} outputs shape {tuple(sample.shape[1:])} per sample, "
            f"the teacher {tuple(teacher_outputs.shape[1:])}"
        )
    n_inputs = len(dataset.train_inputs)
    labels = dataset.train_labels
    tensors = [*dataset.train_inputs, teacher_outputs] + ([labels] if labels is not None else [])

    def compute_loss(batch: list[Any]) -> Any:
        outputs = student(*batch[:n_inputs])
        batch_labels = batch[n_inputs + 1] if labels is not None else None
        return distill.evaluate_distillation_loss(
            dataset.task, outputs, batch[n_inputs], batch_labels, step.temperature, step.alpha
        )

    losses = distill.apply_training(
        student,
        tensors,
        compute_loss,
        epochs=step.epochs,
        lr=step.lr,
        batch_size=step.batch_size,
        seed=seed + index,
        label=f"step{index}-distill",
        writer=writer.get(),
    )
    student.eval()
    return Candidate(student, step.student, dict(step.student_kwargs), []), losses


def _step_label(step: shared.CompressionStep) -> str:
    return ", ".join(f"{k} {v}" for k, v in recipe.build_step_params(step).items() if k not in ("studentKwargs",))


def _environment() -> dict[str, Any]:
    import torch
    import torchao

    return {
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "threads": torch.get_num_threads(),
        "ompNumThreads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def run_compression(config: recipe.CompressionConfig) -> dict[str, Any]:
    """Run the whole job; returns the report of an accepted artifact, raises GateRejected or an error."""
    import torch

    from shipyard.runtime import datasets, evaluate
    from shipyard.runtime.artifacts import manifests, programs, store

    started = time.perf_counter()
    durations: dict[str, float] = {}
    cuda = torch.cuda.is_available()
    device_problems = recipe.assess_device(config.steps, cuda_available=cuda, compiled=config.compiled)
    if device_problems:
        raise CompressionError("; ".join(device_problems))
    device = (
        "cuda"
        if cuda
        and any(s.quantize is not None and s.quantize.needs_cuda for s in config.steps)
        else "cpu"
    )
    output = Path(config.output)
    recipe_digest = build_recipe_digest(config, manifests.load_manifest(config.source).get("digest"))
    if output.exists() and config.reuse_existing and not config.overwrite:
        return reuse_existing_artifact(output, recipe_digest, device)
    if output.exists() and not config.overwrite:
        raise CompressionError(f"output directory {output} already exists (set overwrite: true to replace it)")
    torch.manual_seed(config.seed)

    t0 = time.perf_counter()
    source = store.load_model(config.source, device=device)
    if source.manifest["kind"] != "factory":
        raise CompressionError(
            f"source model {config.source} is a torch.export program: compression steps need a factory-kind "
            "model (factory + weights); export-kind models are served as they are"
        )
    durations["loadSource"] = time.perf_counter() - t0
    name = config.name or source.name
    log.info(
        "Loaded source model %s (%s) from %s in %.2fs", name, source.digest, config.source, durations["loadSource"]
    )

    t0 = time.perf_counter()
    dataset = datasets.load_dataset(config.evaluation.dataset, samples=config.evaluation.samples)
    if device != "cpu":
        dataset = _dataset_to(dataset, device)
    durations["loadDataset"] = time.perf_counter() - t0
    log.info(
        "Loaded dataset %s (%s, %d evaluation and %d training samples%s) in %.2fs",
        config.evaluation.dataset,
        dataset.task,
        dataset.eval_size,
        dataset.train_size,
        ", synthetic" if dataset.synthetic else "",
        durations["loadDataset"],
    )

    problems = datasets.assess_inputs(dataset, source.manifest["inputs"])
    if problems:
        raise CompressionError(
            f"dataset {config.evaluation.dataset!r} does not fit the inputs of source model {config.source}: "
            + "; ".join(problems)
        )

    t0 = time.perf_counter()
    try:
        source_outputs = evaluate.query_outputs(source.module, dataset.eval_inputs)
    except Exception as exc:  # shapes and dtypes fit (checked above): a model/data mismatch they cannot express
        raise CompressionError(
            f"source model {config.source} failed on the evaluation inputs of dataset {config.evaluation.dataset!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    _check_outputs(dataset.task, source_outputs, dataset.name, "source model")
    metrics_before = evaluate.evaluate_metrics(dataset.task, source_outputs, dataset.eval_labels, source_outputs)
    durations["evaluateSource"] = time.perf_counter() - t0
    log.info("Evaluated source model: %s (its latency is timed with the compressed forms)",
             _metrics_text(metrics_before))

    candidate = Candidate(
        module=copy.deepcopy(source.module),
        factory=source.manifest["factory"],
        factory_kwargs=dict(source.manifest.get("factory_kwargs", {})),
        quantization=[dict(r) for r in source.manifest.get("quantization", [])],
    )
    writer = _Writer(config.log_dir)
    step_reports = []
    t_steps = time.perf_counter()
    try:
        for index, step in enumerate(config.steps):
            t0 = time.perf_counter()
            log.info("Started step %d/%d: %s (%s)", index + 1, len(config.steps), step.kind, _step_label(step))
            try:
                if step.prune is not None:
                    details = apply_prune_step(candidate, step.prune, index, dataset, source.module, config.seed,
                                               writer)
                elif step.quantize is not None:
                    details = apply_quantize_step(candidate, step.quantize)
                else:
                    assert step.distill is not None
                    candidate, losses = apply_distill_step(candidate, step.distill, index, dataset, config.seed,
                                                           writer)
                    details = {"losses": losses, "parameters": _count_parameters(candidate.module)}
            except CompressionError as exc:
                raise CompressionError(f"steps[{index}].{step.kind}: {exc}") from exc
            except ValueError as exc:  # PruneError, QuantizationError, training errors
                raise CompressionError(f"steps[{index}].{step.kind}: {exc}") from exc
            elapsed = time.perf_counter() - t0
            step_reports.append(
                {
                    "index": index,
                    "kind": step.kind,
                    "params": recipe.build_step_params(step),
                    "durationSeconds": elapsed,
                    "details": details,
                }
            )
            log.info(
                "Finished step %d/%d: %s in %.2fs (%s)",
                index + 1,
                len(config.steps),
                step.kind,
                elapsed,
                _details_text(details),
            )
    finally:
        writer.close()
    durations["steps"] = time.perf_counter() - t_steps

    encoding = config.encoding
    if encoding == "auto":
        encoding = "safetensors+zstd" if any(s.prune is not None for s in config.steps) else "safetensors"
    candidate.module.eval()
    build_package, no_package = recipe.plan_compiled_build(config.compiled, device)
    with store.stage_directory(output, overwrite=config.overwrite) as staging:
        t0 = time.perf_counter()
        module_cpu = candidate.module.to("cpu") if device != "cpu" else candidate.module
        manifest = store.write_model_files(
            staging,
            module_cpu,
            name=name,
            factory=candidate.factory,
            factory_kwargs=candidate.factory_kwargs,
            inputs=source.manifest["inputs"],
            outputs=source.manifest["outputs"],
            encoding=encoding,
            quantization=candidate.quantization,
            metadata={
                "source": {"path": str(config.source), "digest": source.digest},
                "steps": [{"kind": s.kind, "params": recipe.build_step_params(s)} for s in config.steps],
            },
            # text in: the source's tokenizer file travels into the artifact, so the compressed model takes text too
            tokenizer=source.manifest.get("tokenizer"),
            tokenizer_source=(
                source.path / source.manifest["tokenizer"]["file"] if source.manifest.get("tokenizer") else None
            ),
        )
        durations["save"] = time.perf_counter() - t0
        log.info(
            "Wrote candidate artifact %s (weights %s, %s) in %.2fs",
            manifest["digest"],
            progress.build_bytes_text(store.build_weights_bytes(manifest)),
            encoding,
            durations["save"],
        )
        if build_package:
            manifest, no_package = apply_compiled_package(staging, manifest, module_cpu, dataset, config, durations)

        t0 = time.perf_counter()
        result = store.load_model(staging, device=device, expected_digest=manifest["digest"])
        outputs_after = evaluate.query_outputs(result.module, dataset.eval_inputs)
        _check_outputs(dataset.task, outputs_after, dataset.name, "compressed model")
        metrics_after = evaluate.evaluate_metrics(dataset.task, outputs_after, dataset.eval_labels, source_outputs)
        gate = evaluate.evaluate_gate(
            dataset.task,
            metrics_before,
            metrics_after,
            config.evaluation.max_relative_accuracy_loss,
            config.evaluation.max_relative_loss,
        )
        compiled_section: dict[str, Any] | None = None
        forms: dict[str, Any] = {SOURCE_FORM: source.module, programs.FORM_EAGER: result.module}
        if manifest.get("compiled"):
            compiled_module, compiled_section, compiled_gate = evaluate_compiled(
                staging, manifest, dataset, metrics_before, source_outputs, config
            )
            compiled_section["compileSeconds"] = durations.get("compile")
            if compiled_gate.accepted or config.compiled.requires_package:
                forms[programs.FORM_COMPILED] = compiled_module
                gate = evaluate.GateDecision(
                    accepted=gate.accepted and compiled_gate.accepted,
                    checks=gate.checks
                    + tuple(dataclasses.replace(c, metric=f"{c.metric} (compiled)") for c in compiled_gate.checks),
                )
            else:  # mode auto: a package that fails the gate is dropped, the eager model serves
                no_package = "the package failed the gate: " + "; ".join(c.describe() for c in compiled_gate.failures)
                log.warning("Dropped the AOTInductor package: %s", no_package)
                manifest = store.remove_compiled_package(staging, manifest)
                compiled_section["kept"] = False
                del compiled_module
        # The source and both forms timed side by side (interleaved rounds) at every batch size, so that load on the
        # node hits them alike: the faster form is recorded and served, and compared with the source.
        measured = evaluate.query_interleaved_latency(
            forms, dataset.eval_inputs, config.latency.batch_sizes, budget_s=config.latency.budget_seconds
        )
        latency_before = measured.pop(SOURCE_FORM)
        fastest = programs.build_fastest_form(
            {b: v["p50_ms"] for b, v in measured[programs.FORM_EAGER].items()},
            {b: v["p50_ms"] for b, v in measured[programs.FORM_COMPILED].items()}
            if programs.FORM_COMPILED in measured else None,
            unavailable=no_package,
        )
        if config.compiled.requires_package:
            fastest = {**fastest, "form": programs.FORM_COMPILED, "why": "compiled.mode on; " + fastest["why"]}
        fastest["threads"] = torch.get_num_threads()
        if config.compiled.mode != "off":  # off: nothing to choose, and the digest stays reproducible
            manifest = store.record_fastest(staging, manifest, device, fastest)
            manifests.load_verified_manifest(staging, expected_digest=manifest["digest"])
        served = fastest["form"]
        latency_after = measured[served]
        durations["evaluateResult"] = time.perf_counter() - t0
        log.info(
            "Evaluated compressed model (loaded back from the artifact): %s; %s",
            _metrics_text(metrics_after),
            "; ".join(f"{form}: {_latency_text(values)}" for form, values in measured.items()),
        )
        log.info("Chose the %s form for %s: %s", served, device, fastest["why"])
        if compiled_section is not None and programs.FORM_COMPILED in measured:
            compiled_section["latency"] = {f"batch{b}": dict(v) for b, v in measured[programs.FORM_COMPILED].items()}
            compiled_section["speedupP50"] = {
                f"batch{b}": latency_before[b]["p50_ms"] / v["p50_ms"]
                for b, v in measured[programs.FORM_COMPILED].items()
            }
        durations["total"] = time.perf_counter() - started
        body = report.build_report(
            status="accepted" if gate.accepted else "rejected",
            name=name,
            task=dataset.task,
            dataset={
                "ref": config.evaluation.dataset,
                "evalSamples": dataset.eval_size,
                "trainSamples": dataset.train_size,
                "synthetic": dataset.synthetic,
            },
            source={"path": str(config.source), "digest": source.digest},
            output=str(output) if gate.accepted else None,
            digest=manifest["digest"] if gate.accepted else None,
            bytes_before=store.build_weights_bytes(source.manifest),
            bytes_after=store.build_weights_bytes(manifest),
            artifact_bytes_before=store.fetch_loaded_bytes(source.path, source.manifest),
            artifact_bytes_after=store.fetch_loaded_bytes(staging, manifest),
            parameters_before=_count_parameters(source.module),
            parameters_after=_count_parameters(result.module),
            metrics_before=metrics_before,
            metrics_after=metrics_after,
            gate=gate,
            latency_before=latency_before,
            latency_after=latency_after,
            steps=step_reports,
            durations=durations,
            environment=_environment(),
            compiled=compiled_section,
            served={"device": device, **fastest, "latency": {
                form: {f"batch{b}": dict(v) for b, v in values.items()} for form, values in measured.items()}},
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        body["recipeDigest"] = recipe_digest
        if not gate.accepted:
            for check in gate.failures:
                log.error("Rejected the candidate: %s", check.describe())
            raise GateRejected(body)
        for check in gate.checks:
            log.info("Accepted %s", check.describe())
        (staging / contract.REPORT_FILE).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    log.info("Published artifact %s at %s in %.1fs", manifest["digest"], output, time.perf_counter() - started)
    return body


def build_recipe_digest(config: recipe.CompressionConfig, source_digest: object) -> str:
    """What decides an artifact's content: the source model's digest and every recipe field that changes the result
    (not where it is written, logged or how latency is timed). Pure."""
    fields = recipe.build_recipe_fields(config)
    text = json.dumps({"source": source_digest, **fields}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def reuse_existing_artifact(output: Path, recipe_digest: str, device: str) -> dict[str, Any]:
    """The report of an artifact already at `output`, after checking that it is one: accepted, made by the same
    recipe from the same source, and every file matching its digest. Anything else is refused, never replaced."""
    from shipyard.runtime.artifacts import store

    try:
        body = json.loads((output / contract.REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompressionError(f"output directory {output} already exists and has no readable "
                               f"{contract.REPORT_FILE} ({exc}); not reusing or replacing it") from exc
    if not isinstance(body, dict) or body.get("status") != "accepted" or not body.get("digest"):
        raise CompressionError(f"output directory {output} already exists and is not an accepted artifact; "
                               "not reusing or replacing it")
    if body.get("recipeDigest") != recipe_digest:
        raise CompressionError(f"output directory {output} already exists with an artifact of another recipe or "
                               f"source ({body.get('recipeDigest')} != {recipe_digest}); not reusing or replacing it")
    store.load_model(output, device=device, expected_digest=body["digest"])  # verifies every file
    log.info("Reused the artifact %s already at %s (same recipe and source, digest verified)", body["digest"], output)
    return {**body, "reused": True}


def apply_compiled_package(
    staging: Path, manifest: dict[str, Any], module: Any, dataset: Any, config: recipe.CompressionConfig,
    durations: dict[str, float],
) -> tuple[dict[str, Any], str | None]:
    """Build the AOTInductor package into the staging directory (a one-off cost, `durations["compile"]`, never part of
    the latencies); returns the manifest and, when mode auto could not build it, why (mode on fails the Job)."""
    from shipyard.runtime import artifacts, evaluate
    from shipyard.runtime.artifacts import store

    t0 = time.perf_counter()
    log.info("Started compiling the AOTInductor package (max batch %d%s)", config.compiled.max_batch_size,
             ", max-autotune" if config.compiled.max_autotune else "")
    try:
        manifest = store.add_compiled_package(
            staging, manifest, module, evaluate.build_batch(dataset.eval_inputs, 8),
            max_batch=config.compiled.max_batch_size, max_autotune=config.compiled.max_autotune,
        )
    except artifacts.ArtifactError as exc:
        durations["compile"] = time.perf_counter() - t0
        if config.compiled.requires_package:
            raise CompressionError(f"compiled.mode on: {exc}") from exc
        log.warning("Serving the eager model: could not build the AOTInductor package in %.1fs: %s",
                    durations["compile"], exc)
        return manifest, str(exc)
    durations["compile"] = time.perf_counter() - t0
    log.info("Compiled the AOTInductor package (%s) in %.1fs",
             progress.build_bytes_text(store.build_compiled_bytes(manifest)), durations["compile"])
    return manifest, None


def evaluate_compiled(
    staging: Path,
    manifest: Mapping[str, Any],
    dataset: Any,
    metrics_before: Mapping[str, float],
    source_outputs: Any,
    config: recipe.CompressionConfig,
) -> tuple[Any, dict[str, Any], Any]:
    """Load the AOTInductor package back and gate it like the eager model (its latency is measured next to the eager
    model's by the caller)."""
    from shipyard.runtime import evaluate
    from shipyard.runtime.artifacts import store

    t0 = time.perf_counter()
    compiled = store.load_model(staging, expected_digest=manifest["digest"], compiled=True)
    outputs = evaluate.query_outputs(compiled.module, dataset.eval_inputs)
    metrics = evaluate.evaluate_metrics(dataset.task, outputs, dataset.eval_labels, source_outputs)
    gate = evaluate.evaluate_gate(
        dataset.task,
        metrics_before,
        metrics,
        config.evaluation.max_relative_accuracy_loss,
        config.evaluation.max_relative_loss,
    )
    log.info("Evaluated the AOTInductor package: %s in %.2fs", _metrics_text(metrics), time.perf_counter() - t0)
    section = {
        "file": manifest["compiled"]["file"],
        "bytes": store.build_compiled_bytes(manifest),
        "metrics": dict(metrics),
        "kept": True,
    }
    return compiled.module, section, gate


def _dataset_to(dataset: Any, device: str) -> Any:
    def move(tensors: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(t.to(device) for t in tensors)

    return dataclasses.replace(
        dataset,
        train_inputs=move(dataset.train_inputs),
        eval_inputs=move(dataset.eval_inputs),
        train_labels=dataset.train_labels.to(device) if dataset.train_labels is not None else None,
        eval_labels=dataset.eval_labels.to(device) if dataset.eval_labels is not None else None,
    )


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _latency_text(latency: Mapping[int, Mapping[str, float]]) -> str:
    return ", ".join(f"p50 batch {b} {v['p50_ms']:.3f} ms" for b, v in latency.items())


def _details_text(details: Mapping[str, Any]) -> str:
    parts = []
    if "sparsity" in details:
        parts.append(f"sparsity {details['sparsity']:.1%}")
    if "parameters" in details:
        parts.append(f"parameters {details['parameters']}")
    if "modules" in details:
        parts.append(f"{len(details['modules'])} layers quantized")
    if "losses" in details and details["losses"]:
        parts.append(f"final loss {details['losses'][-1]:.4f}")
    return ", ".join(parts) or "done"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shipyard-runtime compress",
        description="Compress a model (prune, quantize, distill) behind an accuracy gate and write an artifact.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help=f"JSON or YAML compression config (in a Job: {contract.COMPRESSION_CONFIG_MOUNT}/"
        f"{contract.COMPRESSION_CONFIG_FILE})",
    )
    parser.add_argument("--output", help="override the config's output directory")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `shipyard-runtime compress`; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    termination_log: str | None = contract.TERMINATION_LOG
    try:
        document = recipe.load_config_document(args.config)
        if isinstance(document, dict) and isinstance(document.get("terminationLog"), str):
            termination_log = document["terminationLog"]
        if args.output and isinstance(document, dict):
            document = {**document, "output": args.output}
        config = recipe.build_config(document)
    except recipe.ConfigError as exc:
        for problem in exc.problems:
            log.error("Rejected the config: %s", problem)
        apply_termination_log(termination_log, f"Failed: {exc}")
        return EXIT_INVALID_CONFIG
    termination_log = config.termination_log
    try:
        body = run_compression(config)
    except GateRejected as exc:
        print(json.dumps(exc.report, indent=2))
        apply_termination_log(termination_log, str(exc))
        return EXIT_FAILED
    except Exception as exc:  # every failure ends as one clear line and a non-zero exit
        message = str(exc).strip() or type(exc).__name__
        if not isinstance(exc, (CompressionError, ValueError)):
            log.exception("Failed with an unexpected %s", type(exc).__name__)
            message = f"{type(exc).__name__}: {message}"
        log.error("Failed: %s", message)
        apply_termination_log(termination_log, f"Failed: {message}; no artifact written")
        return EXIT_FAILED
    print(json.dumps(body, indent=2))
    apply_termination_log(termination_log, report.build_summary_line(body))
    return EXIT_ACCEPTED
