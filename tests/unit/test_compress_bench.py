"""The compression benchmark's bookkeeping (bench/compression.py): result metadata and target counting, pure."""

from __future__ import annotations

import importlib.util
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


def pruned_report(weights: dict[str, Any], artifact: dict[str, Any] | None) -> dict[str, Any]:
    body = {"bytes": weights, "weightsBytes": weights, "accuracy": {"before": 0.97, "after": 0.968},
            "latency": {"after": {"batch1": {"p50_ms": 0.02}}}}
    if artifact is not None:
        body["artifactBytes"] = artifact
    return body


def fake_results(bench: ModuleType, pruned: dict[str, Any]) -> dict[str, Any]:
    """A results document shaped like main()'s (figures invented), enough for build_targets and print_table."""
    p50 = {1: 0.05, 64: 0.2, 256: 0.6}
    digits_rows = {
        name: {"bytes": size, "accuracy": 0.97, "p50_ms": dict(p50)}
        for name, size in (("fp32 eager", 202872), ("fp32 AOTInductor", 900_000), ("int8 eager (torchao)", 55_000),
                           ("int8 AOTInductor (torchao)", 700_000), ("int8 torch.ao dynamic (baseline)", 60_000))
    }
    digits_rows[bench.STRUCTURED_ROW] = {"bytes": 55_000, "accuracy": 0.965, "p50_ms": {1: 0.04, 64: 0.08, 256: 0.2},
                                         "layers": {"0": [90, 64], "2": [30, 90], "4": [10, 30]}}
    student = {"accuracyMean": 0.96, "accuracyStd": 0.004, "bytesMax": 3000, "ratioMin": 67.6, "teacher": 0.965,
               "artifactBytesMax": 4500, "artifactRatioMin": 45.3, "runs": [{}, {}]}
    minilm_rows = {name: {"bytes": size, "metrics": {"cosine": 0.998, "nn_agreement": 0.97}, "p50_ms": {1: 5.0, 64: 90}}
                   for name, size in (("fp32 eager", 90_000_000), ("int8 eager (torchao)", 23_000_000))}
    return {
        "digits_int8": {"sourceBytes": 202872, "rows": digits_rows,
                        "structuredSpeedup": bench.build_speedups(p50, digits_rows[bench.STRUCTURED_ROW]["p50_ms"])},
        "digits_pruned": {"report": pruned, "bytes": bench.build_size_countings(pruned)},
        "distillation": {"distilled": student, "labels only": student},
        "minilm": {"sourceBytes": 90_000_000, "rows": minilm_rows},
        "machine": {"cpu": "test CPU", "threads": 2, "ompNumThreads": "2", "loadBefore": "0.1", "loadAfter": "0.2"},
    }


@pytest.mark.parametrize(("weights", "artifact", "met"), [
    pytest.param(sizes(202872, 4297), sizes(203794, 6714), True, id="47x-weights-30x-with-manifest-counts-weights"),
    pytest.param(sizes(202872, 5500), sizes(203794, 7900), False, id="37x-weights-misses"),
    pytest.param(sizes(202872, 4297), None, True, id="older-report-without-artifactBytes"),
])
def test_the_size_target_is_counted_on_the_weights_file(
    bench: ModuleType, weights: dict[str, Any], artifact: dict[str, Any] | None, met: bool
) -> None:
    report = pruned_report(weights, artifact)
    counted = bench.build_size_countings(report)
    assert counted == {"weights": weights, "artifact": artifact, "targetCountedOn": "weights"}
    (target,) = [t for t in bench.build_targets(fake_results(bench, report))
                 if t["target"].startswith("digits prune+quantize+encode: smaller")]
    assert "weights file" in target["target"]
    assert target["measured"] == pytest.approx(weights["ratio"]) and target["met"] is met


def test_the_table_shows_both_countings_and_the_structured_row(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    results = fake_results(bench, pruned_report(sizes(202872, 4297), sizes(203794, 6714)))
    bench.print_table(results, bench.build_targets(results))
    out = capsys.readouterr().out
    assert "prune+prune+int8+zstd, weights file" in out and "47.2x" in out
    assert "prune+prune+int8+zstd, + manifest, as loaded" in out and "30.4x" in out
    assert "... + manifest, as loaded" in out and "45.3x" in out
    assert f"digits: {bench.STRUCTURED_ROW}" in out
    assert "Structured pruning alone (0 64->90, 2 90->30, 4 30->10): fp32 p50 / pruned p50 = 1.25x at batch 1, " \
           "2.50x at batch 64, 3.00x at batch 256" in out


def test_build_speedups(bench: ModuleType) -> None:
    assert bench.build_speedups({1: 1.0, 64: 4.0}, {1: 0.5, 64: 4.0, 256: 1.0}) == {1: 2.0, 64: 1.0}


def test_the_structured_row_is_a_structured_prune_alone(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bench's structured-only variant, on a small digits MLP (the bench itself is not run here): the example
    recipe's first step, fp32, layers physically smaller."""
    import torch

    spec = importlib.util.spec_from_file_location("build_models", bench.EXAMPLES / "build_models.py")
    assert spec is not None and spec.loader is not None
    examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(examples)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        examples.build_digits(tmp_path / "digits", hidden=(40, 20), epochs=5)
        step = bench.STRUCTURED_STEP["prune"]
        assert (step["amount"], step["scope"]) == (0.7, "structured")
        assert step == bench._example_config("digits.compression.yaml")["steps"][0]["prune"]
        monkeypatch.setattr(bench, "STRUCTURED_STEP", {"prune": {**step, "fineTuneEpochs": 1}})  # fast
        result = bench.build_structured_pruned(tmp_path, tmp_path / "digits")
    finally:
        torch.set_num_threads(threads)
    assert result["layers"] == {"0": [12, 64], "2": [6, 12], "4": [10, 6]}
    assert [s["kind"] for s in result["report"]["steps"]] == ["prune"]
    assert result["report"]["parameters"]["after"] < result["report"]["parameters"]["before"] / 3
    assert not manifests.load_manifest(result["output"]).get("quantization")  # fp32: no quantize step
