"""Unit tests of the accuracy gate, the metrics and the report/summary line (pure functions)."""

from __future__ import annotations

import math

import pytest
import torch

from shipyard.runtime import evaluate, report


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        pytest.param(0.98, 0.97, (0.98 - 0.97) / 0.98, id="drop"),
        pytest.param(0.90, 0.95, 0.0, id="improved"),
        pytest.param(0.5, 0.5, 0.0, id="equal"),
        pytest.param(0.0, -0.1, math.inf, id="zero-baseline-worse"),
    ],
)
def test_relative_loss(before: float, after: float, expected: float) -> None:
    assert evaluate.evaluate_relative_loss(before, after) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("task", "before", "after", "tolerance", "overrides", "accepted", "failed"),
    [
        pytest.param(
            "classification", {"accuracy": 0.9756}, {"accuracy": 0.9711}, 0.01, None, True, [], id="within-tolerance"
        ),
        pytest.param(
            "classification",
            {"accuracy": 0.9756},
            {"accuracy": 0.4133},
            0.01,
            None,
            False,
            ["accuracy"],
            id="over-pruned",
        ),
        pytest.param("classification", {"accuracy": 1.0}, {"accuracy": 0.99}, 0.01, None, True, [], id="exactly-at"),
        pytest.param("classification", {"accuracy": 0.9}, {"accuracy": 0.9}, 0.0, None, True, [], id="zero-tolerance"),
        pytest.param(
            "binary",
            {"auc": 0.80, "accuracy": 0.7},
            {"auc": 0.79, "accuracy": 0.1},
            0.02,
            None,
            True,
            [],
            id="binary-gates-auc-only",
        ),
        pytest.param(
            "embedding",
            {"cosine": 1.0, "nn_agreement": 1.0},
            {"cosine": 0.997, "nn_agreement": 0.96},
            0.005,
            None,
            True,
            [],
            id="embedding-ok",
        ),
        pytest.param(
            "embedding",
            {"cosine": 1.0, "nn_agreement": 1.0},
            {"cosine": 0.997, "nn_agreement": 0.90},
            0.005,
            None,
            False,
            ["nn_agreement"],
            id="embedding-neighbours-flipped",
        ),
        pytest.param(
            "embedding",
            {"cosine": 1.0, "nn_agreement": 1.0},
            {"cosine": 0.98, "nn_agreement": 0.90},
            0.005,
            {"nn_agreement": 0.2},
            False,
            ["cosine"],
            id="embedding-override",
        ),
    ],
)
def test_gate(task, before, after, tolerance, overrides, accepted, failed) -> None:
    decision = evaluate.evaluate_gate(task, before, after, tolerance, overrides)
    assert decision.accepted is accepted
    assert [c.metric for c in decision.failures] == failed


def test_gate_failure_describes_the_numbers() -> None:
    decision = evaluate.evaluate_gate("classification", {"accuracy": 0.9756}, {"accuracy": 0.4133}, 0.01)
    assert decision.failures[0].describe() == ("accuracy 0.9756 -> 0.4133 (relative loss 57.64% > tolerance 1.00%)")


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        pytest.param([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75, id="sklearn-example"),
        pytest.param([1.0, 2.0, 3.0], [0, 1, 1], 1.0, id="perfect"),
        pytest.param([3.0, 2.0, 1.0], [0, 1, 1], 0.0, id="inverted"),
        pytest.param([1.0, 1.0], [0, 1], 0.5, id="tie"),
    ],
)
def test_auc(scores, labels, expected) -> None:
    assert evaluate.evaluate_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected)


def test_auc_is_nan_with_one_class() -> None:
    assert math.isnan(evaluate.evaluate_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


def test_embedding_metrics() -> None:
    torch.manual_seed(0)
    reference = torch.randn(50, 8)
    assert evaluate.evaluate_metrics("embedding", reference, None, reference) == pytest.approx(
        {"cosine": 1.0, "nn_agreement": 1.0}
    )
    noisy = evaluate.evaluate_metrics("embedding", reference + 0.5 * torch.randn(50, 8), None, reference)
    assert 0.5 < noisy["cosine"] < 0.99 and noisy["nn_agreement"] < 1.0
    # Swapping two rows changes the neighbours of exactly the rows that pointed at them.
    permuted = reference[torch.tensor([1, 0, *range(2, 50)])]
    assert evaluate.evaluate_nn_agreement(permuted, reference) < 1.0


def test_accuracy() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert evaluate.evaluate_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_build_batch_repeats_small_sets() -> None:
    batch = evaluate.build_batch([torch.arange(3)], 7)
    assert batch[0].tolist() == [0, 1, 2, 0, 1, 2, 0]


def _report_kwargs(status: str = "accepted", after_accuracy: float = 0.9733) -> dict:
    gate = evaluate.evaluate_gate("classification", {"accuracy": 0.9756}, {"accuracy": after_accuracy}, 0.01)
    return dict(
        status=status,
        name="digits",
        task="classification",
        dataset={"ref": "builtin:digits"},
        source={"path": "/models/digits", "digest": "sha256:aa"},
        output="/artifacts/x" if status == "accepted" else None,
        digest="sha256:bb" if status == "accepted" else None,
        bytes_before=202872,
        bytes_after=4386,
        parameters_before=50610,
        parameters_after=12000,
        metrics_before={"accuracy": 0.9756},
        metrics_after={"accuracy": after_accuracy},
        gate=gate,
        latency_before={1: {"p50_ms": 0.04}, 64: {"p50_ms": 0.14}},
        latency_after={1: {"p50_ms": 0.02}, 64: {"p50_ms": 0.07}},
        steps=[{"kind": "prune", "params": {"amount": 0.9}}],
        durations={"total": 3.0},
        environment={},
        created_at="2026-01-01T00:00:00+00:00",
        artifact_bytes_before=202872 + 900,
        artifact_bytes_after=4386 + 1400,
    )


def _report(status: str, after_accuracy: float) -> dict:
    return report.build_report(**_report_kwargs(status, after_accuracy))


def test_report_fields() -> None:
    body = _report("accepted", 0.9733)
    assert body["bytes"] == {"before": 202872, "after": 4386, "ratio": pytest.approx(46.25, rel=1e-3)}
    assert body["weightsBytes"] == body["bytes"]  # `bytes` is the weights file's size under its older name
    assert body["artifactBytes"] == {"before": 203772, "after": 5786, "ratio": pytest.approx(35.22, rel=1e-3)}
    assert body["accuracy"]["before"] == 0.9756 and body["accuracy"]["after"] == 0.9733
    assert body["latency"]["speedupP50"] == {"batch1": pytest.approx(2.0), "batch64": pytest.approx(2.0)}
    assert body["gate"]["accepted"] is True and body["digest"] == "sha256:bb"


@pytest.mark.parametrize(
    ("status", "after", "expected"),
    [
        pytest.param(
            "accepted",
            0.9733,
            "Compressed digits: 198.1 KiB -> 4.3 KiB (46.3x smaller); accuracy 0.9756 -> 0.9733 (relative loss "
            "0.24% <= tolerance 1.00%); p50 batch1 0.040 -> 0.020 ms (2.00x, served eager); p50 batch64 0.140 -> "
            "0.070 ms (2.00x, served eager); digest sha256:bb [sourceBytes=202872 compressedBytes=4386 "
            "sourceAccuracy=0.9756 "
            "compressedAccuracy=0.9733 relativeAccuracyLoss=0.002358 sourceLatencyMs=0.04 compressedLatencyMs=0.02 "
            "digest=sha256:bb]",
            id="accepted",
        ),
        pytest.param(
            "rejected",
            0.4133,
            "Rejected digits: accuracy failed the gate: accuracy 0.9756 -> 0.4133 (relative loss 57.64% > "
            "tolerance 1.00%); no artifact written [sourceBytes=202872 sourceAccuracy=0.9756 compressedAccuracy=0.4133 "
            "relativeAccuracyLoss=0.576363 sourceLatencyMs=0.04]",
            id="rejected",
        ),
    ],
)
def test_summary_line(status: str, after: float, expected: str) -> None:
    line = report.build_summary_line(_report(status, after))
    assert line == expected and "\n" not in line


def test_the_summary_line_and_its_figures_are_the_served_forms() -> None:
    """The Compressed event (the Job's summary line) compares the form the pods serve by default with fp32: on the
    demo's digits MLP that is the package (0.035 ms), not torchao's eager int8 (1.795 ms, which the event used to
    show as 0.04x); the eager figure stays in the line, and compressedLatencyMs is the served form's."""
    from shipyard import contract

    eager = {1: {"p50_ms": 1.795}, 64: {"p50_ms": 2.1}}
    compiled = {1: {"p50_ms": 0.035}, 64: {"p50_ms": 0.09}}
    body = report.build_report(**{**_report_kwargs(), "latency_before": {1: {"p50_ms": 0.073}, 64: {"p50_ms": 0.2}},
                                  "latency_after": compiled,
                                  "served": {"device": "cpu", "form": "compiled", "why": "package faster",
                                             "latency": {"eager": {f"batch{b}": v for b, v in eager.items()},
                                                         "compiled": {f"batch{b}": v for b, v in compiled.items()}}}})
    line = report.build_summary_line(body)
    assert ("p50 batch1 0.073 -> 0.035 ms (2.09x, served AOTInductor package, eager 1.795 ms); p50 batch64 0.200 -> "
            "0.090 ms (2.22x, served AOTInductor package, eager 2.100 ms); digest sha256:bb [") in line
    assert body["latency"]["form"] == "compiled"
    assert contract.parse_summary_fields(line)["compressedLatencyMs"] == 0.035


@pytest.mark.parametrize("status", ["accepted", "rejected"])
def test_the_operator_reads_the_summary_numbers_the_runtime_writes(status: str) -> None:
    """The contract both sides share: what lands in status.artifacts[] from the Job's termination message."""
    from shipyard import contract

    body = _report(status, 0.9733 if status == "accepted" else 0.4133)
    fields = contract.parse_summary_fields(report.build_summary_line(body))
    assert fields["sourceBytes"] == 202872 and fields["sourceAccuracy"] == 0.9756
    assert fields["relativeAccuracyLoss"] == pytest.approx(body["accuracy"]["relativeLoss"], abs=1e-6)
    if status == "accepted":
        assert fields["compressedBytes"] == 4386 and fields["digest"] == "sha256:bb"
        assert fields["compressedLatencyMs"] == 0.02
    else:
        assert "compressedBytes" not in fields and fields["compressedAccuracy"] == 0.4133
    long = {**body, "name": "x" * 5000}  # the figures survive a summary cut to the termination limit
    line = report.build_summary_line(long)
    assert len(line) <= report.TERMINATION_LINE_LIMIT and contract.parse_summary_fields(line) == fields


def test_one_line_is_bounded() -> None:
    line = report.build_one_line("a\nb " + "x" * 5000)
    assert line.startswith("a b ") and len(line) == report.TERMINATION_LINE_LIMIT and line.endswith("...")
