"""Benchmark of the compression job against fp32 eager PyTorch, measured in one run on this machine.

Not a test. It builds the example source models (examples/models/build_models.py), runs the real compression
pipeline (`shipyard.runtime.compress.run_compression`, the code behind `shipyard-runtime compress`) with the
**default** served-form setting (`compiled.mode: auto`, no max-autotune) for each scenario, loads each artifact back
in the form the inference server serves by default (`server.loading.plan_served_form`: the form the Job measured
faster, when it fits) and measures it side by side with the fp32 eager source model. The accuracy gates are off
(tolerance 1): a candidate the gate would reject is a row with its figures, never a crash.

Scenarios:
- digits int8: int8-dynamic (torchao). Rows: the eager model and its AOTInductor package (the one the Job chose is
  marked served), `torch.ao.quantization.quantize_dynamic` (deprecated; baseline only), and, timed in the same
  rounds, "structured prune 0.7 (no quantize)", the example recipe's structured step alone (fp32, layers physically
  smaller). With `--reference-packages` (the full run): the fp32 model through the same compiler, so that the
  compiler's share of a speedup is visible.
- digits prune + quantize + encode: examples/models/digits.compression.yaml (structured Ln pruning, global L1
  pruning with fine-tuning, int8, zstd), gate off.
- distilled student + int8: examples/models/digits-distill.compression.yaml over 5 seeds (mean and std), next to
  the same student trained on labels only (alpha = 0), its baseline; no package (accuracy only).
- MiniLM-L6 int8: examples/models/minilm.compression.yaml (int8-dynamic linear layers, int8 embedding tables). Its
  gate set (builtin:sentence-fidelity) is synthetic, so fidelity to fp32 is measured on real sentences it was not
  gated on: builtin:python-docs-sentences (640 sentences from the Python documentation shipped by CPython, PSF
  License Version 2, frozen in runtime/shipyard/runtime/data/ with the licence). Latency on the gate set's inputs.

Bytes are those of the weights file (fp32 safetensors for the source, the artifact's encoded weights after; the
AOTInductor package is a separate, larger file and is listed apart): the Deep Compression paper's counting, which
the size target refers to; the directory as the server loads it (manifest + weights) is printed next to it.
Latency: p50 of one forward pass at batch 1, 64 (and 256 for digits), measured in interleaved rounds (every variant
once per round, the median of the per-round p50s), because the machine may be shared. The package's compile time
is a one-off build cost of the Job: never inside a timed figure, reported with the benchmark's own cost.

Cost: the run's wall time split into compile (cold cache: the run compiles into a fresh TorchInductor cache, as a
new Job pod does; then each default package is compiled once more on the now warm cache), measurement (the timed
rounds and fidelity passes) and the rest (pipelines: training, quantization, the Jobs' own measurements; building
the source models). `--cache-dir DIR` compiles into DIR instead (a second run with the same DIR is a warm run).

It prints a table, writes bench/results/compression.json (with a `meta` block: git commit and dirty flag, Python,
torch, platform, load average before and after, start and end time) and the figures section of bench/README.md
(between its compression markers, generated from the JSON), and its last line is `targets: K/N met`, counted from
the measured figures. Targets (each can fail; none holds by construction):
- digits int8 and MiniLM int8, in the form served by default: >= 1.5x lower p50 than fp32 eager at batch 1 and at
  batch 64 (four targets);
- digits prune + quantize + encode: >= 40x smaller (weights file) and <= 0.5 point accuracy drop, gate off;
- MiniLM int8 (served form) on real sentences: mean cosine to fp32 >= 0.995 and nearest-neighbour agreement >= 95%.
Reported, not targets: int8 size ratios (32/8 bits by construction), the student's size (its architecture), the
distilled student against the labels-only student.

Usage: OMP_NUM_THREADS=2 python bench/compression.py [--quick] [--threads 2] [--reference-packages]
       [--cache-dir DIR] [--out bench/results/compression.json] [--readme bench/README.md | --no-readme]
       python bench/compression.py --readme-only     # regenerate the README section from the JSON
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

if "OMP_NUM_THREADS" not in os.environ:  # before torch is imported: oversubscription makes torch 10x slower
    os.environ["OMP_NUM_THREADS"] = "2"


def _take_cache_dir(argv: list[str]) -> tuple[str, bool]:
    """The TorchInductor cache this run compiles into (set before torch is imported), and whether it starts cold.
    A fresh one (no --cache-dir) is removed when the run ends."""
    for i, arg in enumerate(argv):
        if arg == "--cache-dir" and i + 1 < len(argv):
            path = argv[i + 1]
            break
        if arg.startswith("--cache-dir="):
            path = arg.split("=", 1)[1]
            break
    else:
        path = tempfile.mkdtemp(prefix="shipyard-bench-inductor-")
        import atexit
        import shutil

        atexit.register(shutil.rmtree, path, True)
    os.makedirs(path, exist_ok=True)
    return path, not any(os.scandir(path))


if __name__ == "__main__" and "--readme-only" not in sys.argv:
    CACHE_DIR, CACHE_COLD = _take_cache_dir(sys.argv[1:])
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = CACHE_DIR
else:
    CACHE_DIR, CACHE_COLD = os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""), False

import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
README = ROOT / "bench" / "README.md"
RESULTS = ROOT / "bench" / "results" / "compression.json"
README_BEGIN = "<!-- compression figures: generated by bench/compression.py from bench/results/compression.json -->"
README_END = "<!-- end of compression figures -->"
log = logging.getLogger("bench.compression")

STRUCTURED_ROW = "structured prune 0.7 (no quantize)"
STRUCTURED_STEP = {"prune": {"amount": 0.7, "scope": "structured", "norm": 2, "fineTuneEpochs": 20, "lr": 0.003}}
EAGER_ROW = "int8 eager (torchao)"
COMPILED_ROW = "int8 AOTInductor (torchao)"
BASELINE_ROW = "int8 torch.ao dynamic (baseline)"
FORM_ROWS = {"eager": EAGER_ROW, "compiled": COMPILED_ROW}
GATE_OFF = 1.0  # relative tolerance: every candidate passes; the figures are judged by the targets
SPEEDUP_TARGET = 1.5


# ---------------------------------------------------------------------------------------------------------------
# The benchmark's own cost


class Cost:
    """Wall time by kind: compile (cold/warm cache), measurement, and the rest; each entry labelled."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def add(self, kind: str, label: str, seconds: float) -> None:
        self.entries.append({"kind": kind, "label": label, "seconds": round(seconds, 2)})

    @contextmanager
    def timed(self, kind: str, label: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(kind, label, time.perf_counter() - started)


def build_cost_summary(entries: list[dict[str, Any]], wall: float, *, cold: bool) -> dict[str, Any]:
    """The run's wall time split by kind (pure). Pipelines' seconds include their compile, which is taken out of
    them here so that the kinds add up to the wall time (the rest is building the source models and bookkeeping)."""
    totals: dict[str, float] = {}
    for entry in entries:
        totals[entry["kind"]] = totals.get(entry["kind"], 0.0) + entry["seconds"]
    compile_cold = totals.get("compile", 0.0)
    compile_in_pipelines = sum(e["seconds"] for e in entries if e["kind"] == "compile" and e.get("inPipeline"))
    pipelines = totals.get("pipeline", 0.0) - compile_in_pipelines
    measurement = totals.get("measurement", 0.0)
    warm = totals.get("compile (warm cache)", 0.0)
    return {
        "wallSeconds": round(wall, 1),
        "compileSeconds": round(compile_cold, 1),
        "compileCache": "cold" if cold else "warm",
        "warmCompileSeconds": round(warm, 1),
        "measurementSeconds": round(measurement, 1),
        "pipelineSeconds": round(pipelines, 1),
        "otherSeconds": round(wall - compile_cold - warm - measurement - pipelines, 1),
        "entries": entries,
    }


# ---------------------------------------------------------------------------------------------------------------
# Running the pipeline and loading what it served


def _load_examples() -> Any:
    from tests.modules import load_file

    return load_file("build_models", EXAMPLES / "build_models.py")


def _example_config(name: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((EXAMPLES / name).read_text())


def build_gate_off(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation section with every tolerance at 1 (pure): the gate measures, never rejects."""
    losses = {metric: GATE_OFF for metric in evaluation.get("maxRelativeLoss", {})}
    return {**evaluation, "maxRelativeAccuracyLoss": GATE_OFF, "maxRelativeLoss": losses}


def run_recipe(doc: dict[str, Any], cost: Cost, label: str) -> dict[str, Any]:
    """Run the compression pipeline in-process with the gate off; returns its report. A rejection (which the gate
    off cannot produce, but a future gate might) is returned as the report of a rejected candidate."""
    from shipyard.runtime import compress, recipe

    doc = {**doc, "evaluation": build_gate_off(doc["evaluation"])}
    doc.pop("logDir", None)
    started = time.perf_counter()
    try:
        report = compress.run_compression(recipe.build_config(doc))
    except compress.GateRejected as exc:
        report = exc.report
    cost.add("pipeline", label, time.perf_counter() - started)
    compile_seconds = (report.get("durations") or {}).get("compile")
    if compile_seconds:
        cost.entries.append({"kind": "compile", "label": f"{label}: package", "seconds": round(compile_seconds, 2),
                             "inPipeline": True})
    return report


def load_served(path: str | Path, max_batch_size: int) -> tuple[Any, str, str]:
    """The artifact as `shipyard-runtime serve --compiled auto` loads it on CPU: (module, form, why)."""
    import torch

    from shipyard.runtime.artifacts import manifests, store
    from shipyard.runtime.server import loading

    directory = Path(path).resolve()
    manifest = manifests.load_verified_manifest(directory)
    compiled, why = loading.plan_served_form(manifest, mode="auto", device="cpu", torch_version=torch.__version__,
                                             max_batch_size=max_batch_size)
    module = store.load_model_from_manifest(manifest, directory, compiled=compiled).module
    return module, "compiled" if compiled else "eager", why


def query_interleaved_p50(variants: dict[str, Any], inputs: list[Any], batch_sizes: list[int], *, rounds: int,
                          window_s: float) -> dict[str, dict[int, float]]:
    """p50 latency (ms) per variant and batch size: median over rounds of each round's p50."""
    from shipyard.runtime import evaluate

    samples: dict[str, dict[int, list[float]]] = {v: {b: [] for b in batch_sizes} for v in variants}
    for _ in range(rounds):
        for batch in batch_sizes:
            for name, module in variants.items():
                stats = evaluate.query_latency(module, inputs, batch, budget_s=window_s, min_iterations=5, warmup=3)
                samples[name][batch].append(stats["p50_ms"])
    return {v: {b: statistics.median(times) for b, times in per.items()} for v, per in samples.items()}


def _accuracy(module: Any, dataset: Any) -> float:
    from shipyard.runtime import evaluate

    return evaluate.evaluate_accuracy(evaluate.query_outputs(module, dataset.eval_inputs), dataset.eval_labels)


def _torch_save_bytes(obj: Any) -> int:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def _compile_reference(work: Path, module: Any, manifest: dict[str, Any], name: str, example: list[Any],
                       max_batch: int, cost: Cost) -> tuple[Any, int]:
    """The fp32 model through the same compiler (default settings): the compiler's share of a speedup."""
    from shipyard.runtime.artifacts import store

    with cost.timed("compile", f"{name} fp32 reference package"), store.stage_directory(work / name) as staging:
        written = store.write_model_files(
            staging, module, name=name, factory=manifest["factory"], factory_kwargs=manifest.get("factory_kwargs"),
            inputs=manifest["inputs"], outputs=manifest["outputs"], compile_inputs=example, compile_max_batch=max_batch)
    return store.load_model(work / name, compiled=True).module, store.build_compiled_bytes(written)


def measure_warm_compile(work: Path, artifact: Path, label: str, example: list[Any], cost: Cost) -> float | None:
    """Compile the artifact's eager model once more, on the cache the pipeline just filled: the warm build cost."""
    from shipyard.runtime.artifacts import manifests, store

    manifest = manifests.load_verified_manifest(artifact)
    if not manifest.get("compiled"):
        return None
    module = store.load_model(artifact).module
    scratch = work / f"warm-{label.replace(' ', '-')}"
    started = time.perf_counter()
    with store.stage_directory(scratch) as staging:
        written = store.write_model_files(
            staging, module, name=manifest["name"], factory=manifest["factory"],
            factory_kwargs=manifest.get("factory_kwargs"), inputs=manifest["inputs"], outputs=manifest["outputs"],
            quantization=manifest.get("quantization", []), compile_inputs=example,
            compile_max_batch=manifest["compiled"]["maxBatchSize"])
        assert written.get("compiled")
    seconds = time.perf_counter() - started
    cost.add("compile (warm cache)", f"{label}: package", seconds)
    return seconds


# ---------------------------------------------------------------------------------------------------------------
# Scenarios


def bench_digits_int8(work: Path, source: Path, args: argparse.Namespace, cost: Cost) -> dict[str, Any]:
    import torch

    from shipyard.runtime import datasets, evaluate
    from shipyard.runtime.artifacts import store

    dataset = datasets.load_digits()
    output = work / "artifacts" / "digits-int8"
    doc = {"source": str(source), "output": str(output), "steps": [{"quantize": {"scheme": "int8-dynamic"}}],
           "evaluation": {"dataset": "builtin:digits"}, "terminationLog": str(work / "termination-log")}
    report = run_recipe(doc, cost, "digits int8")
    structured = build_structured_pruned(work, source, cost)
    fp32 = store.load_model(source)
    served, form, why = load_served(output, max_batch_size=256)
    int8 = store.load_model(output)
    variants: dict[str, Any] = {"fp32 eager": fp32.module, EAGER_ROW: int8.module}
    if report.get("compiled") and report["compiled"].get("kept"):  # else the Job built none: eager is served
        variants[COMPILED_ROW] = served if form == "compiled" else store.load_model(output, compiled=True).module
    baseline = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32.module), {torch.nn.Linear}, dtype=torch.qint8)
    variants[BASELINE_ROW] = baseline
    variants[STRUCTURED_ROW] = store.load_model(structured["output"]).module
    reference_bytes = None
    if args.reference_packages:
        variants["fp32 AOTInductor"], reference_bytes = _compile_reference(
            work, fp32.module, fp32.manifest, "digits-fp32-compiled", evaluate.build_batch(dataset.eval_inputs, 8),
            1024, cost)
    with cost.timed("measurement", "digits int8: interleaved rounds, accuracy"):
        p50 = query_interleaved_p50(variants, list(dataset.eval_inputs), [1, 64, 256], rounds=args.rounds,
                                    window_s=args.window)
        accuracy = {name: _accuracy(module, dataset) for name, module in variants.items()}
    source_bytes = store.build_weights_bytes(fp32.manifest)
    rows: dict[str, dict[str, Any]] = {
        "fp32 eager": {"bytes": source_bytes},
        EAGER_ROW: {"bytes": report["weightsBytes"]["after"]},
        BASELINE_ROW: {"bytes": _torch_save_bytes(baseline.state_dict()), "note": "torch.save state_dict (pickle)"},
        STRUCTURED_ROW: {"bytes": structured["report"]["weightsBytes"]["after"],
                         "parameters": structured["report"]["parameters"], "layers": structured["layers"],
                         "note": "fp32, layers physically smaller; zstd weights"},
    }
    if COMPILED_ROW in variants:
        rows[COMPILED_ROW] = {"bytes": report["compiled"]["bytes"], "note": "package incl. native code"}
    if reference_bytes is not None:
        rows["fp32 AOTInductor"] = {"bytes": reference_bytes, "note": "package incl. native code; reference"}
    for name, row in rows.items():
        row.update(accuracy=accuracy[name], p50_ms=p50[name])
    rows[FORM_ROWS[form]]["served"] = True
    return {"sourceBytes": source_bytes, "report": _slim(report), "rows": dict(sorted(rows.items(), key=_row_order)),
            "served": {"form": form, "row": FORM_ROWS[form], "why": why},
            "structuredSpeedup": build_speedups(rows["fp32 eager"]["p50_ms"], rows[STRUCTURED_ROW]["p50_ms"])}


def _row_order(item: tuple[str, Any]) -> int:
    order = ["fp32 eager", "fp32 AOTInductor", EAGER_ROW, COMPILED_ROW, BASELINE_ROW, STRUCTURED_ROW]
    return order.index(item[0]) if item[0] in order else len(order)


def build_structured_pruned(work: Path, source: Path, cost: Cost) -> dict[str, Any]:
    """Structured Ln pruning alone (the first step of the digits example, same parameters), no quantization and no
    package: the artifact and its layer shapes, so the timing shows what physically smaller layers buy on their own."""
    import torch

    from shipyard.runtime.artifacts import store

    doc = {
        "source": str(source), "output": str(work / "artifacts" / "digits-structured"), "steps": [STRUCTURED_STEP],
        "evaluation": {"dataset": "builtin:digits"}, "terminationLog": str(work / "termination-log"),
        "compiled": {"mode": "off"}, "latency": {"batchSizes": [1], "budgetSeconds": 0.2},
    }  # fmt: skip
    report = run_recipe(doc, cost, "digits structured prune")
    module = store.load_model(doc["output"]).module
    layers = {fqn: list(layer.weight.shape) for fqn, layer in module.named_modules()
              if isinstance(layer, torch.nn.Linear)}  # fmt: skip
    return {"output": doc["output"], "report": _slim(report), "layers": layers}


def build_speedups(base: dict[int, float], variant: dict[int, float]) -> dict[int, float]:
    """fp32 p50 / variant p50 per batch size (> 1: the variant is faster). Pure."""
    return {b: base[b] / variant[b] for b in variant if b in base and variant[b] > 0}


def _slim(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "digest", "bytes", "weightsBytes", "artifactBytes", "parameters", "accuracy", "metrics",
            "latency", "compiled", "served", "durations", "gate")
    slim = {k: report.get(k) for k in keep}
    slim["steps"] = [
        {"kind": s["kind"], "params": s["params"], "seconds": s["durationSeconds"]} for s in report["steps"]
    ]
    return slim


def bench_digits_prune(work: Path, source: Path, cost: Cost) -> dict[str, Any]:
    doc = _example_config("digits.compression.yaml")
    doc.update(source=str(source), output=str(work / "artifacts" / "digits-pruned"),
               terminationLog=str(work / "termination-log"))  # fmt: skip
    report = run_recipe(doc, cost, "digits prune+quantize+encode")
    return {"report": _slim(report), "bytes": build_size_countings(report)}


def build_size_countings(report: dict[str, Any]) -> dict[str, Any]:
    """Both ways of counting an artifact's size, from a compression report. Pure.

    `weights`: the weights file alone (the Deep Compression paper's counting; the targets use it); `artifact`: the
    directory as the server loads it, manifest + weights (None in a report from before the field existed).
    """
    weights = report.get("weightsBytes") or report["bytes"]
    return {"weights": weights, "artifact": report.get("artifactBytes"), "targetCountedOn": "weights"}


def bench_distillation(work: Path, source: Path, seeds: int, cost: Cost) -> dict[str, Any]:
    """Distil (and, as the baseline, train on labels only) the digits student once per seed, without a package
    (accuracy and size only). Training a 2.4k-parameter MLP gains nothing from a second thread, so it runs on one;
    the thread count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench_distillation(work, source, seeds, cost)
    finally:
        torch.set_num_threads(threads)


def _bench_distillation(work: Path, source: Path, seeds: int, cost: Cost) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"distilled": [], "labels only": []}
    for seed in range(seeds):
        for variant, alpha in (("distilled", None), ("labels only", 0.0)):
            doc = _example_config("digits-distill.compression.yaml")
            if alpha is not None:
                doc["steps"][0]["distill"]["alpha"] = alpha
            out = work / "artifacts" / f"digits-student-{variant.replace(' ', '-')}-{seed}"
            doc.update(source=str(source), output=str(out), seed=seed, terminationLog=str(work / "termination-log"),
                       compiled={"mode": "off"}, latency={"batchSizes": [1], "budgetSeconds": 0.05})
            report = run_recipe(doc, cost, f"distillation {variant} seed {seed}")
            sizes = build_size_countings(report)
            runs[variant].append({"seed": seed, "accuracy": report["accuracy"]["after"],
                                  "teacher": report["accuracy"]["before"], "bytes": sizes["weights"]["after"],
                                  "sourceBytes": sizes["weights"]["before"],
                                  "artifactBytes": sizes["artifact"]["after"],
                                  "sourceArtifactBytes": sizes["artifact"]["before"]})  # fmt: skip
    summary = {}
    for variant, items in runs.items():
        accuracies = [r["accuracy"] for r in items]
        summary[variant] = {
            "accuracyMean": statistics.mean(accuracies),
            "accuracyStd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "bytesMax": max(r["bytes"] for r in items),
            "ratioMin": min(r["sourceBytes"] / r["bytes"] for r in items),  # weights file
            "artifactBytesMax": max(r["artifactBytes"] for r in items),
            "artifactRatioMin": min(r["sourceArtifactBytes"] / r["artifactBytes"] for r in items),  # + manifest
            "teacher": items[0]["teacher"],
            "runs": items,
        }
    return summary


def build_distillation_verdict(distillation: dict[str, Any]) -> dict[str, Any]:
    """The distilled student against its baseline, the same student trained on labels only (pure)."""
    distilled, labels = distillation["distilled"], distillation["labels only"]
    delta = (distilled["accuracyMean"] - labels["accuracyMean"]) * 100
    spread = max(distilled["accuracyStd"], labels["accuracyStd"]) * 100
    if delta < -spread:
        verdict = "worse than training the same student on labels alone"
    elif delta > spread:
        verdict = "better than training the same student on labels alone"
    else:
        verdict = "no better than training the same student on labels alone (within one standard deviation)"
    return {"deltaPoints": delta, "spreadPoints": spread, "verdict": f"distillation is {verdict}",
            "worse": delta < -spread}


def bench_minilm(work: Path, source: Path, args: argparse.Namespace, cost: Cost) -> dict[str, Any]:
    import torch

    from shipyard.runtime import datasets, evaluate
    from shipyard.runtime.artifacts import store

    gate_set = datasets.load_sentence_fidelity()
    real = datasets.load_dataset("builtin:python-docs-sentences")
    output = work / "artifacts" / "minilm-int8"
    doc = _example_config("minilm.compression.yaml")
    doc.update(source=str(source), output=str(output), terminationLog=str(work / "termination-log"))
    report = run_recipe(doc, cost, "MiniLM int8")
    fp32 = store.load_model(source)
    served, form, why = load_served(output, max_batch_size=64)
    variants: dict[str, Any] = {"fp32 eager": fp32.module, EAGER_ROW: store.load_model(output).module}
    if report.get("compiled") and report["compiled"].get("kept"):
        variants[COMPILED_ROW] = served if form == "compiled" else store.load_model(output, compiled=True).module
    baseline = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32.module), {torch.nn.Linear}, dtype=torch.qint8)
    variants[BASELINE_ROW] = baseline
    reference_bytes = None
    if args.reference_packages:
        variants["fp32 AOTInductor"], reference_bytes = _compile_reference(
            work, fp32.module, fp32.manifest, "minilm-fp32-compiled", evaluate.build_batch(gate_set.eval_inputs, 8),
            1024, cost)
    rows: dict[str, dict[str, Any]] = {name: {} for name in variants}
    with cost.timed("measurement", "MiniLM int8: fidelity on real sentences and the gate set"):
        for dataset, key in ((real, "metrics"), (gate_set, "gateSetMetrics")):
            reference = evaluate.query_outputs(fp32.module, dataset.eval_inputs)
            for name, module in variants.items():
                rows[name][key] = evaluate.evaluate_metrics(
                    "embedding", evaluate.query_outputs(module, dataset.eval_inputs), None, reference)
    with cost.timed("measurement", "MiniLM int8: interleaved rounds"):
        p50 = query_interleaved_p50(variants, list(gate_set.eval_inputs), [1, 64], rounds=args.rounds,
                                    window_s=args.window * 4)
    source_bytes = store.build_weights_bytes(fp32.manifest)
    rows["fp32 eager"]["bytes"] = source_bytes
    rows[EAGER_ROW]["bytes"] = report["weightsBytes"]["after"]
    if COMPILED_ROW in rows:
        rows[COMPILED_ROW].update(bytes=report["compiled"]["bytes"], note="package incl. native code")
    rows[BASELINE_ROW].update(bytes=_torch_save_bytes(baseline.state_dict()),
                              note="embeddings stay fp32; torch.save (pickle)")
    if reference_bytes is not None:
        rows["fp32 AOTInductor"].update(bytes=reference_bytes, note="package incl. native code; reference")
    for name, row in rows.items():
        row["p50_ms"] = p50[name]
    rows[FORM_ROWS[form]]["served"] = True
    return {"sourceBytes": source_bytes, "report": _slim(report), "rows": dict(sorted(rows.items(), key=_row_order)),
            "served": {"form": form, "row": FORM_ROWS[form], "why": why},
            "fidelitySet": {"dataset": "builtin:python-docs-sentences", "sentences": real.eval_size,
                            "source": "Python documentation shipped by CPython (pydoc_data.topics)",
                            "licence": "PSF License Version 2 (runtime/shipyard/runtime/data/LICENSE-PSF.txt)"},
            "latencySet": "builtin:sentence-fidelity (the gate set's token batches)"}


# ---------------------------------------------------------------------------------------------------------------
# Targets, table, README


def _by_batch(values: dict[Any, float]) -> dict[int, float]:
    """p50s keyed by batch size as ints (JSON turns them into strings). Pure."""
    return {int(k): v for k, v in values.items()}


def served_row(scenario: dict[str, Any]) -> dict[str, Any]:
    """The row of the form served by default (pure)."""
    return scenario["rows"][scenario["served"]["row"]]


def build_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured figure and whether it is met. Pure."""
    targets = []

    def add(name: str, value: float, threshold: float, met: bool, unit: str, why: str = "") -> None:
        targets.append({"target": name, "measured": value, "threshold": threshold, "unit": unit, "met": bool(met),
                        "why": "" if met else why})  # fmt: skip

    for key, label in (("digits_int8", "digits int8"), ("minilm", "MiniLM int8")):
        scenario = results[key]
        row, base = _by_batch(served_row(scenario)["p50_ms"]), _by_batch(scenario["rows"]["fp32 eager"]["p50_ms"])
        form = "AOTInductor package" if scenario["served"]["form"] == "compiled" else "eager"
        for batch in (1, 64):
            speedup = base[batch] / row[batch]
            add(f"{label} served by default ({form}): p50 vs fp32 eager at batch {batch}", speedup, SPEEDUP_TARGET,
                speedup >= SPEEDUP_TARGET, "x", f"{row[batch]:.4g} ms vs fp32 {base[batch]:.4g} ms")

    p = results["digits_pruned"]["report"]
    weights_ratio = (p.get("weightsBytes") or p["bytes"])["ratio"]  # weights file alone, as the paper counts
    add("digits prune+quantize+encode: smaller (weights file)", weights_ratio, 40.0, weights_ratio >= 40.0, "x")
    drop = (p["accuracy"]["before"] - p["accuracy"]["after"]) * 100
    add("digits prune+quantize+encode: accuracy drop, gate off", drop, 0.5, drop <= 0.5, "points")

    metrics = served_row(results["minilm"])["metrics"]
    add("MiniLM int8 (served form): mean cosine to fp32 on real sentences", metrics["cosine"], 0.995,
        metrics["cosine"] >= 0.995, "")
    add("MiniLM int8 (served form): nearest-neighbour agreement on real sentences", metrics["nn_agreement"], 0.95,
        metrics["nn_agreement"] >= 0.95, "")
    return targets


def _fmt_bytes(size: float | None) -> str:
    if size is None:
        return "-"
    return f"{size / 1024:.1f} KiB" if size < 1 << 20 else f"{size / (1 << 20):.1f} MiB"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def build_table_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """The table's rows as text cells (pure): one per variant, the served form marked `*`."""
    out: list[dict[str, str]] = []

    def row(name: str, size: float | None, ratio: float | None, quality: str, p50: dict[Any, float] | None,
            base: dict[Any, float] | None, served: bool = False) -> None:
        p50, base = _by_batch(p50 or {}), _by_batch(base or {})
        out.append({
            "variant": ("* " if served else "") + name, "bytes": _fmt_bytes(size),
            "ratio": f"{ratio:.1f}x" if ratio else "-", "quality": quality,
            **{f"p50 b{b}": _fmt_ms(p50.get(b)) for b in (1, 64, 256)},
            **{f"x b{b}": f"{base[b] / p50[b]:.2f}x" if b in p50 and b in base else "-" for b in (1, 64)},
        })

    d = results["digits_int8"]
    base = d["rows"]["fp32 eager"]["p50_ms"]
    for name, r in d["rows"].items():
        row(f"digits: {name}", r["bytes"], d["sourceBytes"] / r["bytes"], f"acc {r['accuracy'] * 100:.2f}%",
            r["p50_ms"], base, r.get("served", False))
    pr = results["digits_pruned"]["report"]
    sizes = build_size_countings(pr)
    served = (pr.get("latency") or {}).get("form", "eager")
    for counting, label in (("weights", "weights file"), ("artifact", "+ manifest, as loaded")):
        size = sizes[counting]
        if size is None:
            continue
        after = pr["latency"]["after"]["batch1"]["p50_ms"] if counting == "weights" else None
        before = pr["latency"]["before"]["batch1"]["p50_ms"] if counting == "weights" else None
        row(f"digits: prune+prune+int8+zstd, {label}", size["after"], size["ratio"],
            f"acc {pr['accuracy']['after'] * 100:.2f}%", {1: after} if after else None,
            {1: before} if before else None, bool(after) and served == "compiled")
    for variant, s in results["distillation"].items():
        row(f"digits: student+int8, {variant} ({len(s['runs'])} seeds)", s["bytesMax"], s["ratioMin"],
            f"acc {s['accuracyMean'] * 100:.2f}±{s['accuracyStd'] * 100:.2f}%", None, None)
    verdict = build_distillation_verdict(results["distillation"])
    row("digits: student, distilled - labels only" + (": WORSE" if verdict["worse"] else ""), None, None,
        f"{verdict['deltaPoints']:+.2f} points", None, None)
    m = results["minilm"]
    mbase = m["rows"]["fp32 eager"]["p50_ms"]
    for name, r in m["rows"].items():
        quality = f"cos {r['metrics']['cosine']:.4f} nn {r['metrics']['nn_agreement'] * 100:.1f}%"
        row(f"MiniLM: {name}", r["bytes"], m["sourceBytes"] / r["bytes"], quality, r["p50_ms"], mbase,
            r.get("served", False))
    return out


COLUMNS = [("variant", 52, "<"), ("bytes", 10, ">"), ("ratio", 7, ">"), ("quality", 22, ">"), ("p50 b1", 8, ">"),
           ("p50 b64", 8, ">"), ("p50 b256", 8, ">"), ("x b1", 7, ">"), ("x b64", 7, ">")]


def print_table(results: dict[str, Any], targets: list[dict[str, Any]]) -> None:
    machine = results["machine"]
    print()
    print(f"Compression benchmark on {machine['cpu']} ({machine['threads']} torch threads, OMP_NUM_THREADS="
          f"{machine['ompNumThreads']}; load average before/after {machine['loadBefore']} / {machine['loadAfter']})"
          + ("; QUICK run" if results.get("quick") else ""))
    print("p50 in ms; x = fp32 eager p50 / variant p50; * = the form served by default; accuracy gates off")
    print()
    header = " ".join(f"{name:{align}{width}}" for name, width, align in COLUMNS)
    print(header)
    print("-" * len(header))
    for cells in build_table_rows(results):
        print(" ".join(f"{cells[name]:{align}{width}}" for name, width, align in COLUMNS))
    print()
    for line in build_findings(results):
        print(line)
    print()
    for t in targets:
        mark = "met " if t["met"] else "MISS"
        line = f"[{mark}] {t['target']}: {t['measured']:.4g}{t['unit']} (target {t['threshold']}{t['unit']})"
        print(line + (f" - {t['why']}" if t["why"] else ""))


def build_findings(results: dict[str, Any]) -> list[str]:
    """What the table says that a target does not (pure): the served forms and why, structured pruning alone, the
    distilled student against its baseline, the cost of the run."""
    lines = []
    for key, label in (("digits_int8", "digits int8"), ("minilm", "MiniLM int8")):
        served = results[key]["served"]
        lines.append(f"{label}: the server serves the {served['form']} form: {served['why']}")
    pruned = results["digits_pruned"]["report"].get("served") or {}
    if pruned:
        lines.append(f"digits prune+prune+int8+zstd: p50 at batch 1 is the Job's own timing of its served form "
                     f"({pruned.get('form')}), against the source in the same rounds")
    speedup = results["digits_int8"].get("structuredSpeedup")
    if speedup:
        layers = results["digits_int8"]["rows"][STRUCTURED_ROW]["layers"]
        shapes = ", ".join(f"{fqn} {shape[1]}->{shape[0]}" for fqn, shape in layers.items())
        lines.append(f"Structured pruning alone ({shapes}): fp32 p50 / pruned p50 = "
                     + ", ".join(f"{x:.2f}x at batch {b}" for b, x in speedup.items()))
    verdict = build_distillation_verdict(results["distillation"])
    d = results["distillation"]
    lines.append(f"Distillation: the distilled student {d['distilled']['accuracyMean'] * 100:.2f}% vs the same student "
                 f"on labels only {d['labels only']['accuracyMean'] * 100:.2f}% ({verdict['deltaPoints']:+.2f} "
                 f"points): {verdict['verdict']}.")
    c = results.get("cost")
    if c:
        lines.append(f"Cost: {c['wallSeconds']:.0f} s wall = compile {c['compileSeconds']:.0f} s ({c['compileCache']} "
                     f"cache) + warm re-compile {c['warmCompileSeconds']:.0f} s + measurement "
                     f"{c['measurementSeconds']:.0f} s + pipelines {c['pipelineSeconds']:.0f} s + other "
                     f"{c['otherSeconds']:.0f} s")
    return lines


def build_readme_section(results: dict[str, Any]) -> str:
    """The figures section of bench/README.md, from the results JSON (pure): markdown between the markers."""
    machine, meta, cost = results["machine"], results["meta"], results["cost"]
    lines = [README_BEGIN, ""]
    run = ("**quick run** (`--quick`: fewer rounds and seeds, no fp32 reference packages; a smoke run, which the full "
           "run's figures replace)" if results.get("quick") else "full run")
    lines.append(f"{run} of commit `{(meta.get('gitCommit') or 'unknown')[:12]}`"
                 f"{' (uncommitted changes)' if meta.get('gitDirty') else ''} on {machine['cpu']}, "
                 f"{machine['cores']} cores, {machine['threads']} torch threads, torch {machine['torch']}, torchao "
                 f"{machine['torchao']}; load average {machine['loadBefore']} before, {machine['loadAfter']} after; "
                 f"{meta['startedAt']}.")
    if float(machine["loadBefore"].split()[0]) >= (machine.get("cores") or 1):
        lines.append("")
        lines.append("**A shared machine:** the load average was at or above the core count, so other work ran beside "
                     "the measurement; a timing in one round can be off by 10x or more, which the medians over rounds "
                     "only partly absorb. Run it on a quiet machine for figures to compare.")
    lines.append("")
    names = [name for name, _, _ in COLUMNS]
    lines.append("| " + " | ".join(names) + " |")
    lines.append("|" + "|".join("---" if align == "<" else "---:" for _, _, align in COLUMNS) + "|")
    for cells in build_table_rows(results):
        lines.append("| " + " | ".join(cells[name].replace("|", "\\|") for name in names) + " |")
    lines.append("")
    lines.append("p50 in ms; x = fp32 eager p50 / variant p50; `*` = the form served by default.")
    lines.append("")
    for line in build_findings(results):
        lines.append(f"- {line}")
    lines.append("")
    lines.append("Compile time per package (one-off, in the Job; never in a timed figure):")
    lines.append("")
    for entry in cost["entries"]:
        if entry["kind"].startswith("compile"):
            cache = "warm cache" if "warm" in entry["kind"] else f"{cost['compileCache']} cache"
            lines.append(f"- {entry['label']}: {entry['seconds']:.1f} s ({cache})")
    lines.append("")
    met = sum(t["met"] for t in results["targets"])
    lines.append(f"Targets: {met}/{len(results['targets'])} met.")
    lines.append("")
    for t in results["targets"]:
        mark = "met" if t["met"] else "**MISS**"
        lines.append(f"- {mark}: {t['target']}: {t['measured']:.4g}{t['unit']} (target {t['threshold']}{t['unit']})"
                     + (f": {t['why']}" if t["why"] else ""))
    lines.append("")
    lines.append(README_END)
    return "\n".join(lines)


def apply_readme_section(text: str, section: str) -> str:
    """`text` with the section between the markers replaced (pure); raises ValueError without the markers."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError("bench/README.md has no compression markers")
    return text[:start] + section + text[end + len(README_END):]


def write_readme(results: dict[str, Any], readme: Path) -> None:
    readme.write_text(apply_readme_section(readme.read_text(), build_readme_section(results)))


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 3 rounds, no fp32 reference packages")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--window", type=float, default=0.25, help="seconds per latency window")
    parser.add_argument("--reference-packages", action=argparse.BooleanOptionalAction, default=None,
                        help="also compile the fp32 models (the compiler's share of a speedup); default: full runs")
    parser.add_argument("--cache-dir", help="TorchInductor cache to compile into (default: a fresh one, cold)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README, help="README whose figures section is rewritten")
    parser.add_argument("--no-readme", dest="readme", action="store_const", const=None)
    parser.add_argument("--readme-only", action="store_true", help="rewrite the README section from --out and exit")
    args = parser.parse_args(argv)
    if args.readme_only:
        write_readme(json.loads(args.out.read_text()), args.readme or README)
        return 0
    args.rounds = args.rounds or (3 if args.quick else 7)
    if args.reference_packages is None:
        args.reference_packages = not args.quick
    seeds = 2 if args.quick else 5

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
    sys.path.insert(1, str(ROOT))  # tests.modules, from the checkout
    import torch
    import torchao
    from benchmeta import build_meta, fetch_git_state

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    cost = Cost()
    started = time.perf_counter()
    started_at = time.time()
    load_before_raw = os.getloadavg()
    git_head, git_status = fetch_git_state()  # the code as it was when the run started
    results: dict[str, Any] = {}
    log.info("Compiling into %s (%s cache)", CACHE_DIR, "cold" if CACHE_COLD else "warm")
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-compression-") as tmp:
        work = Path(tmp)
        examples = _load_examples()
        with cost.timed("setup", "building the source models"):
            examples.build_digits(work / "models" / "digits")
            examples.build_minilm(work / "models" / "minilm")
        log.info("Measuring digits int8")
        results["digits_int8"] = bench_digits_int8(work, work / "models" / "digits", args, cost)
        log.info("Measuring digits prune + quantize + encode")
        results["digits_pruned"] = bench_digits_prune(work, work / "models" / "digits", cost)
        log.info("Measuring the distilled student over %d seeds", seeds)
        results["distillation"] = bench_distillation(work, work / "models" / "digits", seeds, cost)
        log.info("Measuring MiniLM int8")
        results["minilm"] = bench_minilm(work, work / "models" / "minilm", args, cost)
        log.info("Compiling the default packages again, on the warm cache")
        from shipyard.runtime import datasets, evaluate

        examples_inputs = {
            "digits int8": evaluate.build_batch(datasets.load_digits().eval_inputs, 8),
            "MiniLM int8": evaluate.build_batch(datasets.load_sentence_fidelity().eval_inputs, 8),
        }
        for label, artifact in (("digits int8", "digits-int8"), ("MiniLM int8", "minilm-int8")):
            measure_warm_compile(work, work / "artifacts" / artifact, label, examples_inputs[label], cost)

    load_after_raw = os.getloadavg()
    results["meta"] = build_meta(
        git_head, git_status, python=platform.python_version(), torch_version=torch.__version__,
        platform_name=platform.platform(), load_before=load_before_raw, load_after=load_after_raw,
        started=started_at, finished=time.time(),
    )  # fmt: skip
    results["machine"] = {
        "cpu": platform.processor() or _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "ompNumThreads": os.environ.get("OMP_NUM_THREADS"),
        "loadBefore": " ".join(f"{x:.2f}" for x in load_before_raw),
        "loadAfter": " ".join(f"{x:.2f}" for x in load_after_raw),
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }
    results["quick"] = args.quick
    results["notMeasured"] = ("CUDA paths (fp8, int4-weight-only, fp16/bf16 serving): no GPU on the machine this "
                              "ran on" if not torch.cuda.is_available() else None)
    results["seconds"] = time.perf_counter() - started
    results["cost"] = build_cost_summary(cost.entries, results["seconds"], cold=CACHE_COLD)
    results["createdAt"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    targets = build_targets(results)
    results["targets"] = targets
    results["distillationVerdict"] = build_distillation_verdict(results["distillation"])
    met = sum(t["met"] for t in targets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp_out, args.out)
    results = json.loads(args.out.read_text())  # the table and README show what the JSON holds
    if args.readme is not None:
        write_readme(results, args.readme)
    print_table(results, targets)
    print(f"results: {args.out} ({results['seconds']:.0f}s)")
    print(f"targets: {met}/{len(targets)} met")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
