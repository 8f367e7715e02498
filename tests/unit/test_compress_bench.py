"""The compression benchmark's bookkeeping (bench/compression.py): targets, gate off, table, README and cost, pure;
and the committed README section against the committed results JSON."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from shipyard.runtime.artifacts import manifests
from tests.modules import load_file

BENCH = Path(__file__).resolve().parents[2] / "bench" / "compression.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_file("bench_compression", BENCH)


def sizes(before: int, after: int) -> dict[str, Any]:
    return {"before": before, "after": after, "ratio": before / after}


def pruned_report(weights: dict[str, Any], artifact: dict[str, Any] | None, after: float = 0.968) -> dict[str, Any]:
    body = {"bytes": weights, "weightsBytes": weights, "accuracy": {"before": 0.97, "after": after},
            "latency": {"before": {"batch1": {"p50_ms": 0.04}}, "after": {"batch1": {"p50_ms": 0.02}},
                        "form": "compiled"}, "served": {"form": "compiled"}}
    if artifact is not None:
        body["artifactBytes"] = artifact
    return body


def student(mean: float, std: float = 0.003) -> dict[str, Any]:
    return {"accuracyMean": mean, "accuracyStd": std, "bytesMax": 3000, "ratioMin": 67.6, "teacher": 0.965,
            "artifactBytesMax": 4500, "artifactRatioMin": 45.3, "runs": [{}, {}]}


def fake_results(bench: ModuleType, pruned: dict[str, Any], *, served: str = "compiled",
                 compiled_p50: dict[int, float] | None = None) -> dict[str, Any]:
    """A results document shaped like main()'s (figures invented), enough for targets, table and README."""
    fp32 = {1: 0.05, 64: 0.2, 256: 0.6}
    compiled = compiled_p50 or {1: 0.01, 64: 0.1, 256: 0.3}
    digits_rows = {
        "fp32 eager": {"bytes": 202872, "accuracy": 0.97, "p50_ms": fp32},
        bench.EAGER_ROW: {"bytes": 55_000, "accuracy": 0.97, "p50_ms": {1: 0.6, 64: 0.8, 256: 1.1}},
        bench.COMPILED_ROW: {"bytes": 700_000, "accuracy": 0.97, "p50_ms": compiled},
        bench.BASELINE_ROW: {"bytes": 60_000, "accuracy": 0.97, "p50_ms": {1: 0.1, 64: 0.15, 256: 0.25}},
        bench.STRUCTURED_ROW: {"bytes": 55_000, "accuracy": 0.965, "p50_ms": {1: 0.04, 64: 0.08, 256: 0.2},
                               "layers": {"0": [90, 64], "2": [30, 90], "4": [10, 30]}},
    }
    digits_rows[bench.FORM_ROWS[served]]["served"] = True
    minilm_rows = {
        "fp32 eager": {"bytes": 90_000_000, "metrics": {"cosine": 1.0, "nn_agreement": 1.0},
                       "p50_ms": {1: 10, 64: 140}},
        bench.EAGER_ROW: {"bytes": 23_000_000, "metrics": {"cosine": 0.997, "nn_agreement": 0.96},
                          "p50_ms": {1: 70, 64: 180}},
        bench.COMPILED_ROW: {"bytes": 60_000_000, "metrics": {"cosine": 0.997, "nn_agreement": 0.96},
                             "p50_ms": {1: 4, 64: 80}, "served": True},
    }
    cost = bench.build_cost_summary([
        {"kind": "setup", "label": "building the source models", "seconds": 10.0},
        {"kind": "pipeline", "label": "digits int8", "seconds": 40.0},
        {"kind": "compile", "label": "digits int8: package", "seconds": 30.0, "inPipeline": True},
        {"kind": "compile (warm cache)", "label": "digits int8: package", "seconds": 5.0},
        {"kind": "measurement", "label": "digits int8: interleaved rounds, accuracy", "seconds": 20.0},
    ], 80.0, cold=True)
    return {
        "digits_int8": {"sourceBytes": 202872, "rows": digits_rows,
                        "served": {"form": served, "row": bench.FORM_ROWS[served], "why": "measured"},
                        "structuredSpeedup": bench.build_speedups(fp32, digits_rows[bench.STRUCTURED_ROW]["p50_ms"])},
        "digits_pruned": {"report": pruned, "bytes": bench.build_size_countings(pruned)},
        "distillation": {"distilled": student(0.978), "labels only": student(0.986)},
        "minilm": {"sourceBytes": 90_000_000, "rows": minilm_rows,
                   "served": {"form": "compiled", "row": bench.COMPILED_ROW, "why": "measured"}},
        "machine": {"cpu": "test CPU", "cores": 2, "threads": 2, "ompNumThreads": "2", "loadBefore": "0.1",
                    "loadAfter": "0.2", "torch": "2.13.0", "torchao": "0.18.0"},
        "meta": {"gitCommit": "0123456789abcdef", "gitDirty": False, "startedAt": "2026-12-01T00:00:00Z"},
        "cost": cost,
        "quick": False,
    }


def _target(bench: ModuleType, results: dict[str, Any], start: str) -> dict[str, Any]:
    (target,) = [t for t in bench.build_targets(results) if t["target"].startswith(start)]
    return target


def test_the_targets_are_the_issues_and_none_holds_by_construction(bench: ModuleType) -> None:
    targets = bench.build_targets(fake_results(bench, pruned_report(sizes(202872, 4297), None)))
    names = [t["target"] for t in targets]
    assert len(names) == 8
    assert sum("p50 vs fp32 eager" in n for n in names) == 4  # digits and MiniLM, batch 1 and 64
    assert not any("int8: smaller" in n or "student" in n for n in names)  # 32/8 arithmetic, the architecture
    assert all("real sentences" in n for n in names if "cosine" in n or "neighbour" in n)


@pytest.mark.parametrize(("served", "compiled", "batch", "measured", "met"), [
    pytest.param("compiled", {1: 0.01, 64: 0.1, 256: 0.3}, 1, 5.0, True, id="package-served-5x-at-1"),
    pytest.param("compiled", {1: 0.01, 64: 0.15, 256: 0.3}, 64, 1.333, False, id="package-served-1.3x-at-64"),
    pytest.param("eager", None, 1, 0.0833, False, id="eager-served-is-what-counts"),
])
def test_the_speed_targets_time_the_form_served_by_default(bench: ModuleType, served: str, compiled: Any,
                                                          batch: int, measured: float, met: bool) -> None:
    results = fake_results(bench, pruned_report(sizes(202872, 4297), None), served=served, compiled_p50=compiled)
    form = "AOTInductor package" if served == "compiled" else "eager"
    target = _target(bench, results, f"digits int8 served by default ({form}): p50 vs fp32 eager at batch {batch}")
    assert target["measured"] == pytest.approx(measured, rel=1e-3) and target["met"] is met
    reloaded = json.loads(json.dumps(results))  # JSON keys are strings: the targets read them alike
    assert bench.build_targets(reloaded) == bench.build_targets(results)


@pytest.mark.parametrize(("weights", "after", "size_met", "drop_met"), [
    pytest.param(sizes(202872, 4297), 0.968, True, True, id="47x-0.2-points"),
    pytest.param(sizes(202872, 5500), 0.968, False, True, id="37x-misses"),
    pytest.param(sizes(202872, 4297), 0.96, True, False, id="1-point-drop-misses"),
])
def test_prune_quantize_encode_targets(bench: ModuleType, weights: dict[str, Any], after: float, size_met: bool,
                                       drop_met: bool) -> None:
    report = pruned_report(weights, sizes(203794, 6714), after)
    counted = bench.build_size_countings(report)
    assert counted == {"weights": weights, "artifact": sizes(203794, 6714), "targetCountedOn": "weights"}
    results = fake_results(bench, report)
    size = _target(bench, results, "digits prune+quantize+encode: smaller (weights file)")
    drop = _target(bench, results, "digits prune+quantize+encode: accuracy drop, gate off")
    assert size["measured"] == pytest.approx(weights["ratio"]) and size["met"] is size_met
    assert drop["met"] is drop_met


def test_the_gate_is_off_and_a_rejection_is_a_row(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    from shipyard.runtime import compress

    evaluation = {"dataset": "builtin:sentence-fidelity", "maxRelativeAccuracyLoss": 0.005,
                  "maxRelativeLoss": {"nn_agreement": 0.05}}
    assert bench.build_gate_off(evaluation) == {"dataset": "builtin:sentence-fidelity", "maxRelativeAccuracyLoss": 1.0,
                                                "maxRelativeLoss": {"nn_agreement": 1.0}}
    seen: list[Any] = []

    def reject(config: Any) -> dict[str, Any]:
        seen.append(config)
        raise compress.GateRejected({"status": "rejected", "name": "digits", "accuracy": {"after": 0.4},
                                     "gate": {"checks": []}, "durations": {"compile": 12.5}})

    monkeypatch.setattr(compress, "run_compression", reject)
    cost = bench.Cost()
    doc = {"source": "/s", "output": "/o", "steps": [{"quantize": {"scheme": "int8-dynamic"}}],
           "evaluation": evaluation, "logDir": "/tb"}
    report = bench.run_recipe(doc, cost, "digits int8")
    assert report["status"] == "rejected" and report["accuracy"]["after"] == 0.4
    assert seen[0].evaluation.max_relative_accuracy_loss == 1.0 and seen[0].log_dir is None
    assert [e["kind"] for e in cost.entries] == ["pipeline", "compile"]


def test_the_cost_adds_up_to_the_wall_time(bench: ModuleType) -> None:
    cost = fake_results(bench, pruned_report(sizes(202872, 4297), None))["cost"]
    assert (cost["compileSeconds"], cost["warmCompileSeconds"], cost["measurementSeconds"],
            cost["pipelineSeconds"]) == (30.0, 5.0, 20.0, 10.0)  # the pipeline's 40 s less its 30 s compile
    parts = ("compileSeconds", "warmCompileSeconds", "measurementSeconds", "pipelineSeconds", "otherSeconds")
    assert sum(cost[p] for p in parts) == pytest.approx(cost["wallSeconds"])
    assert cost["compileCache"] == "cold"


@pytest.mark.parametrize(("distilled", "labels", "worse", "verdict"), [
    pytest.param(0.978, 0.986, True, "distillation is worse than training the same student on labels alone",
                 id="worse"),
    pytest.param(0.986, 0.978, False, "distillation is better", id="better"),
    pytest.param(0.980, 0.981, False, "no better than", id="within-noise"),
])
def test_the_distilled_student_against_its_labels_only_baseline(bench: ModuleType, distilled: float, labels: float,
                                                                worse: bool, verdict: str) -> None:
    got = bench.build_distillation_verdict({"distilled": student(distilled), "labels only": student(labels)})
    assert got["worse"] is worse and verdict in got["verdict"]
    assert got["deltaPoints"] == pytest.approx((distilled - labels) * 100)


def test_the_table_marks_the_served_form_and_says_what_distillation_does(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    results = fake_results(bench, pruned_report(sizes(202872, 4297), sizes(203794, 6714)))
    bench.print_table(results, bench.build_targets(results))
    out = capsys.readouterr().out
    assert f"* digits: {bench.COMPILED_ROW}" in out and f"* MiniLM: {bench.COMPILED_ROW}" in out
    assert f"  digits: {bench.EAGER_ROW}" not in out and f"digits: {bench.EAGER_ROW}" in out
    assert "* digits: prune+prune+int8+zstd, weights file" in out and "47.2x" in out
    assert "digits: student, distilled - labels only: WORSE" in out and "-0.80 points" in out
    assert "prune+prune+int8+zstd, + manifest, as loaded" in out and "30.4x" in out
    assert ("Distillation: the distilled student 97.80% vs the same student on labels only 98.60% (-0.80 points): "
            "distillation is worse than training the same student on labels alone.") in out
    assert "Structured pruning alone (0 64->90, 2 90->30, 4 30->10): fp32 p50 / pruned p50 = 1.25x at batch 1, " \
           "2.50x at batch 64, 3.00x at batch 256" in out
    assert "Cost: 80 s wall = compile 30 s (cold cache) + warm re-compile 5 s + measurement 20 s" in out


def test_build_speedups(bench: ModuleType) -> None:
    assert bench.build_speedups({1: 1.0, 64: 4.0}, {1: 0.5, 64: 4.0, 256: 1.0}) == {1: 2.0, 64: 1.0}


def test_the_readme_section_is_generated_between_its_markers(bench: ModuleType) -> None:
    results = fake_results(bench, pruned_report(sizes(202872, 4297), sizes(203794, 6714)))
    results["targets"] = bench.build_targets(results)
    section = bench.build_readme_section(json.loads(json.dumps(results)))
    assert section.startswith(bench.README_BEGIN) and section.endswith(bench.README_END)
    assert f"| * digits: {bench.COMPILED_ROW} |" in section and "Targets: " in section
    assert "- digits int8: package: 30.0 s (cold cache)" in section and "(warm cache)" in section
    text = f"# Benchmarks\n\nbefore\n\n{bench.README_BEGIN}\nold figures\n{bench.README_END}\n\nafter\n"
    assert bench.apply_readme_section(text, section) == f"# Benchmarks\n\nbefore\n\n{section}\n\nafter\n"
    with pytest.raises(ValueError, match="no compression markers"):
        bench.apply_readme_section("# Benchmarks\n", section)


def test_the_committed_readme_shows_the_committed_results(bench: ModuleType) -> None:
    """bench/README.md's compression figures are generated from bench/results/compression.json: they must agree
    (after a run, `python bench/compression.py --readme-only` rewrites the section)."""
    results = json.loads(bench.RESULTS.read_text())
    readme = bench.README.read_text()
    start, end = readme.index(bench.README_BEGIN), readme.index(bench.README_END) + len(bench.README_END)
    assert readme[start:end] == bench.build_readme_section(results)
    assert results["targets"] == bench.build_targets(results)  # the counted targets follow from the figures


def test_the_structured_row_is_a_structured_prune_alone(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench's structured-only variant, on a small digits MLP (the bench itself is not run here): the example
    recipe's first step, fp32, layers physically smaller, no package."""
    import torch

    examples = load_file("build_models", bench.EXAMPLES / "build_models.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        examples.build_digits(tmp_path / "digits", hidden=(40, 20), epochs=5)
        step = bench.STRUCTURED_STEP["prune"]
        assert (step["amount"], step["scope"]) == (0.7, "structured")
        assert step == bench._example_config("digits.compression.yaml")["steps"][0]["prune"]
        fast = copy.deepcopy(bench.STRUCTURED_STEP)
        fast["prune"]["fineTuneEpochs"] = 1
        monkeypatch.setattr(bench, "STRUCTURED_STEP", fast)
        result = bench.build_structured_pruned(tmp_path, tmp_path / "digits", bench.Cost())
    finally:
        torch.set_num_threads(threads)
    assert result["layers"] == {"0": [12, 64], "2": [6, 12], "4": [10, 6]}
    assert [s["kind"] for s in result["report"]["steps"]] == ["prune"]
    assert result["report"]["parameters"]["after"] < result["report"]["parameters"]["before"] / 3
    manifest = manifests.load_manifest(result["output"])
    assert not manifest.get("quantization") and not manifest.get("compiled")  # fp32, no package
