"""The analysis evaluator: thresholds, noData, comparison with the stable, verdicts, queries and scrape math."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shipyard import contract
from shipyard.operator import analysis
from shipyard.operator import spec as spec_mod
from shipyard.operator.analysis import Phase

NOW = datetime.datetime(2025, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
INF = math.inf
NAN = math.nan


def metric(
    max: float | None = None,
    min: float | None = None,
    rel: float | None = None,
    provider: spec_mod.MetricProvider | None = None,
    name: str = "m",
) -> spec_mod.Metric:
    return spec_mod.Metric(
        name=name,
        provider=provider or spec_mod.PrometheusProvider(query='q{version="{{version}}"}'),
        max=max,
        min=min,
        max_relative_to_stable=rel,
    )


ERROR_RATE = spec_mod.BuiltinProvider(metric="errorRate")
LATENCY = spec_mod.BuiltinProvider(metric="latencyP99")


# ---------------------------------------------------------------------------------------------------------------
# Thresholds


@pytest.mark.parametrize(
    ("spec", "candidate", "stable", "phase"),
    [
        pytest.param(metric(max=0.01), 0.005, None, Phase.SUCCESSFUL, id="max-below"),
        pytest.param(metric(max=0.01), 0.01, None, Phase.SUCCESSFUL, id="max-equal-passes"),
        pytest.param(metric(max=0.01), 0.0100001, None, Phase.FAILED, id="max-above"),
        pytest.param(metric(min=0.9), 0.95, None, Phase.SUCCESSFUL, id="min-above"),
        pytest.param(metric(min=0.9), 0.9, None, Phase.SUCCESSFUL, id="min-equal-passes"),
        pytest.param(metric(min=0.9), 0.89, None, Phase.FAILED, id="min-below"),
        pytest.param(metric(min=1, max=2), 1.5, None, Phase.SUCCESSFUL, id="band-inside"),
        pytest.param(metric(min=1, max=2), 2.5, None, Phase.FAILED, id="band-above"),
        pytest.param(metric(min=1, max=2), 0.5, None, Phase.FAILED, id="band-below"),
        pytest.param(metric(max=-1.0), -2.0, None, Phase.SUCCESSFUL, id="negative-max"),
        pytest.param(metric(max=0.25), INF, None, Phase.FAILED, id="plus-inf-fails-max"),
        pytest.param(metric(min=0.0), -INF, None, Phase.FAILED, id="minus-inf-fails-min"),
        pytest.param(metric(min=0.0), INF, None, Phase.SUCCESSFUL, id="plus-inf-passes-min"),
        pytest.param(metric(max=0.25), 0.0, None, Phase.SUCCESSFUL, id="zero"),
    ],
)
def test_absolute_thresholds(spec: spec_mod.Metric, candidate: float, stable: float | None, phase: Phase) -> None:
    got, message = analysis.evaluate_measurement(spec, candidate, stable, "Inconclusive")
    assert got is phase, message
    assert message


@pytest.mark.parametrize(
    ("spec", "candidate", "stable", "phase"),
    [
        pytest.param(metric(rel=0.1), 0.5, 0.5, Phase.SUCCESSFUL, id="same-as-stable"),
        pytest.param(metric(rel=0.1), 0.549, 0.5, Phase.SUCCESSFUL, id="within-10-percent"),
        pytest.param(metric(rel=0.1), 0.551, 0.5, Phase.FAILED, id="beyond-10-percent"),
        pytest.param(metric(rel=0.0), 0.5, 0.5, Phase.SUCCESSFUL, id="zero-tolerance-equal"),
        pytest.param(metric(rel=0.0), 0.5001, 0.5, Phase.FAILED, id="zero-tolerance-worse"),
        pytest.param(metric(rel=0.1), 0.1, 0.5, Phase.SUCCESSFUL, id="better-than-stable"),
        pytest.param(metric(rel=1.0), 0.99, 0.5, Phase.SUCCESSFUL, id="double-allowed"),
        # The floor: a near-zero stable does not fail a near-zero candidate.
        pytest.param(metric(rel=0.1, provider=ERROR_RATE), 0.0, 0.0, Phase.SUCCESSFUL, id="error-rate-0-vs-0"),
        pytest.param(metric(rel=0.1, provider=ERROR_RATE), 0.0001, 0.0, Phase.SUCCESSFUL, id="error-rate-floor-0.0001"),
        pytest.param(metric(rel=0.1, provider=ERROR_RATE), 0.0011, 0.0, Phase.SUCCESSFUL, id="error-rate-at-floor"),
        pytest.param(metric(rel=0.1, provider=ERROR_RATE), 0.0012, 0.0, Phase.FAILED, id="error-rate-above-floor"),
        pytest.param(metric(rel=0.1, provider=ERROR_RATE), 0.05, 0.0, Phase.FAILED, id="error-rate-5-percent-vs-0"),
        pytest.param(metric(rel=0.1, provider=ERROR_RATE), 0.021, 0.02, Phase.SUCCESSFUL, id="error-rate-relative-ok"),
        pytest.param(metric(rel=0.1, provider=LATENCY), 0.005, 0.001, Phase.SUCCESSFUL, id="latency-floor-5ms"),
        pytest.param(metric(rel=0.1, provider=LATENCY), 0.006, 0.001, Phase.FAILED, id="latency-above-floor"),
        pytest.param(metric(rel=0.1, provider=LATENCY), 0.12, 0.1, Phase.FAILED, id="latency-20-percent-worse"),
        pytest.param(metric(rel=0.1), 0.0001, 0.0, Phase.SUCCESSFUL, id="custom-floor-0.001"),
        pytest.param(metric(rel=0.1), 0.002, 0.0, Phase.FAILED, id="custom-above-floor"),
        pytest.param(metric(rel=0.1), 0.0005, -5.0, Phase.SUCCESSFUL, id="negative-stable-raised-to-floor"),
        pytest.param(metric(rel=0.1), INF, 0.5, Phase.FAILED, id="inf-candidate-fails"),
        # Absolute and relative together: either failing fails.
        pytest.param(metric(max=0.01, rel=0.1), 0.02, 0.02, Phase.FAILED, id="relative-ok-absolute-fails"),
        pytest.param(metric(max=0.5, rel=0.1), 0.3, 0.1, Phase.FAILED, id="absolute-ok-relative-fails"),
        pytest.param(metric(max=0.5, rel=0.1), 0.1, 0.1, Phase.SUCCESSFUL, id="both-ok"),
    ],
)
def test_relative_to_stable(spec: spec_mod.Metric, candidate: float, stable: float, phase: Phase) -> None:
    got, message = analysis.evaluate_measurement(spec, candidate, stable, "Fail")
    assert got is phase, message


def test_relative_floor_is_documented_per_builtin() -> None:
    assert analysis.build_relative_floor(metric(rel=0.1, provider=ERROR_RATE)) == 0.001
    assert analysis.build_relative_floor(metric(rel=0.1, provider=LATENCY)) == 0.005
    assert analysis.build_relative_floor(metric(rel=0.1)) == analysis.DEFAULT_RELATIVE_FLOOR
    scrape = spec_mod.ScrapeProvider(metric="x")
    assert analysis.build_relative_floor(metric(rel=0.1, provider=scrape)) == analysis.DEFAULT_RELATIVE_FLOOR


@pytest.mark.parametrize(
    ("spec", "stable", "policy", "phase"),
    [
        pytest.param(metric(rel=0.1), None, "Inconclusive", Phase.INCONCLUSIVE, id="stable-none-inconclusive"),
        pytest.param(metric(rel=0.1), None, "Fail", Phase.FAILED, id="stable-none-fail"),
        pytest.param(metric(rel=0.1), None, "Ignore", Phase.SKIPPED, id="stable-none-ignore"),
        pytest.param(metric(rel=0.1), NAN, "Inconclusive", Phase.INCONCLUSIVE, id="stable-nan"),
        pytest.param(metric(rel=0.1), INF, "Inconclusive", Phase.INCONCLUSIVE, id="stable-inf-not-comparable"),
        pytest.param(metric(max=0.1, rel=0.1), None, "Inconclusive", Phase.FAILED, id="absolute-failure-wins"),
        pytest.param(metric(max=0.9, rel=0.1), None, "Inconclusive", Phase.INCONCLUSIVE, id="absolute-pass-waits"),
    ],
)
def test_stable_without_data(
    spec: spec_mod.Metric, stable: float | None, policy: spec_mod.NoDataPolicy, phase: Phase
) -> None:
    got, message = analysis.evaluate_measurement(spec, 0.5, stable, policy)
    assert got is phase, message


def test_no_stable_version_skips_the_relative_threshold() -> None:
    got, message = analysis.evaluate_measurement(metric(rel=0.1), 0.5, None, "Fail", has_stable=False)
    assert got is Phase.SUCCESSFUL
    assert "no stable version" in message
    got, _ = analysis.evaluate_measurement(metric(max=0.1, rel=0.1), 0.5, None, "Fail", has_stable=False)
    assert got is Phase.FAILED


# ---------------------------------------------------------------------------------------------------------------
# noData


@pytest.mark.parametrize("value", [pytest.param(None, id="none"), pytest.param(NAN, id="nan")])
@pytest.mark.parametrize(
    ("policy", "phase"),
    [
        pytest.param("Fail", Phase.FAILED, id="fail"),
        pytest.param("Inconclusive", Phase.INCONCLUSIVE, id="inconclusive"),
        pytest.param("Ignore", Phase.SKIPPED, id="ignore"),
    ],
)
def test_no_data_policy(value: float | None, policy: spec_mod.NoDataPolicy, phase: Phase) -> None:
    got, message = analysis.evaluate_measurement(metric(max=0.01, rel=0.1), value, 0.0, policy)
    assert got is phase
    assert "no data" in message and policy in message


# ---------------------------------------------------------------------------------------------------------------
# Samples with provider errors


def sample(value: float | None = None, error: str | None = None) -> analysis.Sample:
    return analysis.Sample(value=value, query="q", error=error)


@pytest.mark.parametrize(
    ("spec", "measurement", "phase"),
    [
        pytest.param(metric(max=1), analysis.Measurement(sample(error="refused")), Phase.ERROR, id="candidate-error"),
        pytest.param(metric(rel=0.1), analysis.Measurement(sample(0.5), sample(error="timeout")), Phase.ERROR,
                     id="stable-error-decides"),
        pytest.param(metric(max=0.1, rel=0.1), analysis.Measurement(sample(0.5), sample(error="timeout")),
                     Phase.FAILED, id="absolute-failure-despite-stable-error"),
        pytest.param(metric(rel=0.1), analysis.Measurement(sample(None), sample(error="timeout")),
                     Phase.INCONCLUSIVE, id="candidate-no-data-despite-stable-error"),
        pytest.param(metric(max=1), analysis.Measurement(sample(0.5), sample(error="unused")), Phase.SUCCESSFUL,
                     id="stable-error-unused-without-relative"),
        pytest.param(metric(rel=0.1), analysis.Measurement(sample(0.5)), Phase.SUCCESSFUL,
                     id="no-stable-sample-no-stable-version"),
        pytest.param(metric(rel=0.1), analysis.Measurement(sample(0.5), sample(0.1)), Phase.FAILED,
                     id="values-compared"),
    ],
)
def test_evaluate_sample(spec: spec_mod.Metric, measurement: analysis.Measurement, phase: Phase) -> None:
    got, message = analysis.evaluate_sample(spec, measurement, "Inconclusive")
    assert got is phase, message


def test_sample_has_data() -> None:
    assert sample(0.0).has_data
    assert not sample(None).has_data
    assert not sample(NAN).has_data
    assert not sample(1.0, error="x").has_data


# ---------------------------------------------------------------------------------------------------------------
# Folding measurements into the per-metric counters

OK = analysis.Measurement(sample(0.001))
BAD = analysis.Measurement(sample(0.5))
EMPTY = analysis.Measurement(sample(None))
DOWN = analysis.Measurement(sample(error="connection refused"))


def fold(measurements: Sequence[analysis.Measurement], policy: spec_mod.NoDataPolicy = "Inconclusive") -> dict[
        str, Any]:
    result: dict[str, Any] | None = None
    for i, m in enumerate(measurements):
        result = analysis.build_metric_result(result, metric(max=0.01), m, policy, NOW + datetime.timedelta(seconds=i))
        result = json.loads(json.dumps(result, allow_nan=False))  # what the API server stores
    assert result is not None
    return result


@pytest.mark.parametrize(
    ("measurements", "policy", "expected"),
    [
        pytest.param([OK, OK], "Inconclusive", dict(successes=2, failures=0, verdict="Successful"), id="two-ok"),
        pytest.param([OK, BAD], "Inconclusive", dict(successes=1, failures=1, verdict="Failed"), id="ok-then-bad"),
        pytest.param([DOWN, DOWN, DOWN], "Inconclusive", dict(errors=3, consecutiveErrors=3, verdict="Error"),
                     id="errors-in-a-row"),
        pytest.param([DOWN, DOWN, OK, DOWN], "Inconclusive", dict(errors=3, consecutiveErrors=1, successes=1),
                     id="success-resets-consecutive-errors"),
        pytest.param([DOWN, BAD], "Inconclusive", dict(errors=1, consecutiveErrors=0, failures=1),
                     id="failure-resets-consecutive-errors"),
        pytest.param([EMPTY, EMPTY], "Inconclusive", dict(inconclusive=2, verdict="Inconclusive"),
                     id="no-data-inconclusive"),
        pytest.param([EMPTY], "Fail", dict(failures=1, verdict="Failed"), id="no-data-fail"),
        pytest.param([OK, EMPTY], "Ignore", dict(successes=1, failures=0, inconclusive=0, verdict="Successful"),
                     id="no-data-ignored-keeps-verdict"),
        pytest.param([EMPTY], "Ignore", dict(successes=0, inconclusive=0, verdict="Pending"),
                     id="no-data-ignored-first"),
        pytest.param([DOWN, DOWN, EMPTY], "Ignore", dict(errors=2, consecutiveErrors=0),
                     id="ignored-resets-consecutive-errors"),
    ],
)
def test_fold_counters(
    measurements: Sequence[analysis.Measurement], policy: spec_mod.NoDataPolicy, expected: Mapping[str, Any]
) -> None:
    result = fold(measurements, policy)
    for key, value in expected.items():
        assert result[key] == value, key


def test_fold_records_query_values_and_time() -> None:
    spec = metric(rel=0.1)
    m = analysis.Measurement(analysis.Sample(0.2, "resolved query"), analysis.Sample(0.1, "stable query"))
    result = analysis.build_metric_result(None, spec, m, "Inconclusive", NOW)
    assert result == {
        "name": "m", "provider": "prometheus", "query": "resolved query", "lastValue": 0.2, "stableValue": 0.1,
        "verdict": "Failed", "message": result["message"], "successes": 0, "failures": 1, "inconclusive": 0,
        "errors": 0, "consecutiveErrors": 0, "lastMeasuredAt": "2025-03-01T12:00:00Z",
    }
    assert "0.2 > stable 0.1" in result["message"]


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        pytest.param(INF, None, id="inf"),
        pytest.param(-INF, None, id="minus-inf"),
        pytest.param(NAN, None, id="nan"),
        pytest.param(0.25, 0.25, id="finite"),
    ],
)
def test_fold_stores_only_json_numbers(value: float, stored: float | None) -> None:
    result = analysis.build_metric_result(None, metric(max=1), analysis.Measurement(sample(value)), "Fail", NOW)
    assert result["lastValue"] == stored
    json.dumps(result, allow_nan=False)


def test_fold_tolerates_garbage_in_previous_status() -> None:
    previous = {"successes": "3", "failures": -1, "errors": True, "verdict": "Bogus", "consecutiveErrors": 2.5}
    result = analysis.build_metric_result(previous, metric(max=1), OK, "Fail", NOW)
    assert (result["successes"], result["failures"], result["errors"], result["consecutiveErrors"]) == (1, 0, 0, 0)


def test_fold_clips_long_text_to_the_crd_limit() -> None:
    m = analysis.Measurement(analysis.Sample(None, "q" * 10_000, error="e" * 10_000))
    result = analysis.build_metric_result(None, metric(max=1), m, "Fail", NOW)
    assert len(result["query"]) == len(result["message"]) == analysis.MAX_TEXT


# ---------------------------------------------------------------------------------------------------------------
# Verdict of the analysis


def result(name: str = "m", successes: int = 0, failures: int = 0, inconclusive: int = 0, errors: int = 0,
           consecutive: int = 0, verdict: str = "Successful", measured: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "successes": successes, "failures": failures, "inconclusive": inconclusive,
                           "errors": errors, "consecutiveErrors": consecutive, "verdict": verdict, "message": "x"}
    if measured:
        out["lastMeasuredAt"] = "2025-03-01T12:00:00Z"
    return out


@pytest.mark.parametrize(
    ("results", "failure_limit", "error_limit", "min_samples", "phase"),
    [
        pytest.param([result(failures=1, verdict="Failed")], 0, 4, 1, Phase.FAILED, id="limit0-one-failure-fails"),
        pytest.param([result(successes=1)], 0, 4, 1, Phase.SUCCESSFUL, id="limit0-no-failure"),
        pytest.param([result(successes=3, failures=1)], 1, 4, 1, Phase.SUCCESSFUL, id="limit1-one-failure-tolerated"),
        pytest.param([result(successes=3, failures=2)], 1, 4, 1, Phase.FAILED, id="limit1-two-failures-fail"),
        pytest.param([result(successes=3, failures=2)], 2, 4, 1, Phase.SUCCESSFUL, id="limit2-two-tolerated"),
        pytest.param([result(successes=3, failures=3)], 2, 4, 1, Phase.FAILED, id="limit2-three-fail"),
        pytest.param([result(successes=5), result("n", failures=2)], 1, 4, 1, Phase.FAILED,
                     id="limits-are-per-metric"),
        pytest.param([result(successes=5, failures=1), result("n", successes=5, failures=1)], 1, 4, 1,
                     Phase.SUCCESSFUL, id="failures-not-summed-over-metrics"),
        pytest.param([result(errors=4, consecutive=4, verdict="Error")], 1, 4, 1, Phase.RUNNING,
                     id="errors-at-limit-tolerated"),
        pytest.param([result(errors=5, consecutive=5, verdict="Error")], 1, 4, 1, Phase.ERROR,
                     id="errors-beyond-limit"),
        pytest.param([result(errors=1, consecutive=1, verdict="Error")], 1, 0, 1, Phase.ERROR,
                     id="error-limit-0"),
        pytest.param([result(successes=3, errors=9, consecutive=0)], 1, 4, 1, Phase.SUCCESSFUL,
                     id="scattered-errors-tolerated"),
        pytest.param([result(failures=2, errors=9, consecutive=9, verdict="Error")], 1, 4, 1, Phase.FAILED,
                     id="failure-reported-before-error"),
        pytest.param([result(successes=2)], 1, 4, 3, Phase.RUNNING, id="min-samples-not-reached"),
        pytest.param([result(successes=3)], 1, 4, 3, Phase.SUCCESSFUL, id="min-samples-reached"),
        pytest.param([result(successes=3), result("n", successes=1)], 1, 4, 3, Phase.RUNNING,
                     id="every-metric-needs-min-samples"),
        pytest.param([result(successes=3, inconclusive=1, verdict="Inconclusive")], 1, 4, 1, Phase.INCONCLUSIVE,
                     id="currently-no-data-blocks-success"),
        pytest.param([result(successes=3, inconclusive=4, verdict="Successful")], 1, 4, 1, Phase.SUCCESSFUL,
                     id="data-again-clears-inconclusive"),
        pytest.param([result(inconclusive=2, verdict="Inconclusive")], 0, 4, 1, Phase.INCONCLUSIVE,
                     id="never-data-inconclusive-not-failed"),
        pytest.param([result(successes=1, failures=1, verdict="Failed")], 1, 4, 2, Phase.RUNNING,
                     id="tolerated-failure-still-running"),
        pytest.param([result(verdict="Pending", measured=False)], 1, 4, 1, Phase.PENDING, id="pending"),
        pytest.param([result(verdict="Pending", measured=True)], 1, 4, 1, Phase.RUNNING, id="ignored-measured"),
        pytest.param([], 1, 4, 1, Phase.SUCCESSFUL, id="no-metrics"),
    ],
)
def test_assess_analysis(
    results: Sequence[Mapping[str, Any]], failure_limit: int, error_limit: int, min_samples: int, phase: Phase
) -> None:
    assessment = analysis.assess_analysis(results, failure_limit, error_limit, min_samples)
    assert assessment.phase is phase, assessment.message
    assert assessment.message


@pytest.mark.parametrize(
    ("initial_delay", "failure_limit", "interval", "bound"),
    [
        pytest.param(0.0, 0, 30.0, 30.0, id="defaults-limit0"),
        pytest.param(0.0, 1, 30.0, 60.0, id="default-limit1"),
        pytest.param(60.0, 2, 15.0, 105.0, id="delay-limit2"),
        pytest.param(10.0, 100, 1.0, 111.0, id="fast"),
    ],
)
def test_detection_bound(initial_delay: float, failure_limit: int, interval: float, bound: float) -> None:
    assert analysis.build_detection_bound_seconds(initial_delay, failure_limit, interval) == bound
    spec = spec_mod.Analysis(metrics=(), interval_seconds=interval, initial_delay_seconds=initial_delay,
                             failure_limit=failure_limit)
    assert spec.detection_bound_seconds == bound  # the same rule as the spec's


# ---------------------------------------------------------------------------------------------------------------
# status.analysis over time


def analysis_spec(*metrics: spec_mod.Metric, failure_limit: int = 1, min_samples: int = 2,
                  no_data: spec_mod.NoDataPolicy = "Inconclusive") -> spec_mod.Analysis:
    return spec_mod.Analysis(metrics=metrics, interval_seconds=15.0, initial_delay_seconds=30.0,
                             failure_limit=failure_limit, min_samples=min_samples, no_data=no_data)


ERR = metric(max=0.01, name="error-rate", provider=ERROR_RATE)
P99 = metric(max=0.25, name="p99", provider=LATENCY)


def run(spec: spec_mod.Analysis, rounds: Sequence[Mapping[str, analysis.Measurement]], version: str = "1.1",
        status: Mapping[str, Any] | None = None, roundtrip: bool = True) -> dict[str, Any]:
    current: dict[str, Any] | None = dict(status) if status is not None else None
    for i, measurements in enumerate(rounds):
        now = NOW + datetime.timedelta(seconds=15 * i)
        current = analysis.build_analysis_status(current, spec, version, measurements, NOW, now)
        if roundtrip:
            current = json.loads(json.dumps(current, allow_nan=False))
    assert current is not None
    return current


@pytest.mark.parametrize(
    ("rounds", "phase"),
    [
        pytest.param([{}], "Pending", id="nothing-measured"),
        pytest.param([{"error-rate": OK, "p99": OK}], "Running", id="one-round"),
        pytest.param([{"error-rate": OK, "p99": OK}] * 2, "Successful", id="min-samples"),
        pytest.param([{"error-rate": OK, "p99": OK}, {"error-rate": OK}], "Running", id="one-metric-behind"),
        pytest.param([{"error-rate": BAD, "p99": OK}, {"error-rate": BAD, "p99": OK}], "Failed", id="fails"),
        pytest.param([{"error-rate": BAD, "p99": OK}, {"error-rate": BAD}, {"error-rate": OK, "p99": OK}] * 2,
                     "Failed", id="failed-is-final"),
        pytest.param([{"error-rate": DOWN, "p99": OK}] * 4, "Running", id="errors-tolerated"),
        pytest.param([{"error-rate": DOWN, "p99": OK}] * 5, "Error", id="errors-beyond-limit"),
        pytest.param([{"error-rate": EMPTY, "p99": OK}] * 3, "Inconclusive", id="no-data"),
        pytest.param([{"error-rate": EMPTY, "p99": OK}] * 3 + [{"error-rate": OK}] * 2, "Successful",
                     id="no-data-then-data"),
    ],
)
def test_analysis_status_over_time(rounds: Sequence[Mapping[str, analysis.Measurement]], phase: str) -> None:
    status = run(analysis_spec(ERR, P99), rounds)
    assert status["phase"] == phase, status["message"]
    assert [m["name"] for m in status["metrics"]] == ["error-rate", "p99"]
    assert status["detectionBoundSeconds"] == 30.0 + 2 * 15.0
    assert status["startedAt"] == "2025-03-01T12:00:00Z"


def test_failed_analysis_does_not_fold_later_measurements() -> None:
    spec = analysis_spec(ERR, failure_limit=0)
    failed = run(spec, [{"error-rate": BAD}])
    later = run(spec, [{"error-rate": OK}] * 3, status=failed)
    assert later["phase"] == "Failed"
    assert later["metrics"] == failed["metrics"]


def test_new_version_starts_from_zero() -> None:
    spec = analysis_spec(ERR, failure_limit=0)
    failed = run(spec, [{"error-rate": BAD}], version="1.1")
    fresh = run(spec, [{"error-rate": OK}], version="1.2", status=failed)
    assert fresh["version"] == "1.2"
    assert fresh["phase"] == "Running"
    assert fresh["metrics"][0]["failures"] == 0 and fresh["metrics"][0]["successes"] == 1


def test_restart_continues_from_status() -> None:
    """A restarted operator only has the stored status: folding from it gives what an uninterrupted run gives."""
    spec = analysis_spec(ERR, P99, failure_limit=2, min_samples=3)
    rounds = [{"error-rate": OK, "p99": BAD}, {"error-rate": DOWN, "p99": OK}, {"error-rate": OK, "p99": BAD},
              {"error-rate": OK, "p99": OK}]
    uninterrupted = run(spec, rounds, roundtrip=False)
    stored = run(spec, rounds[:2])
    resumed = analysis.build_analysis_status(stored, spec, "1.1", rounds[2], NOW, NOW + datetime.timedelta(seconds=30))
    resumed = analysis.build_analysis_status(resumed, spec, "1.1", rounds[3], NOW, NOW + datetime.timedelta(seconds=45))
    assert resumed == uninterrupted
    assert resumed["phase"] == "Running"
    assert [m["failures"] for m in resumed["metrics"]] == [0, 2]


def test_metrics_removed_from_spec_are_dropped() -> None:
    status = run(analysis_spec(ERR, P99), [{"error-rate": OK, "p99": OK}])
    status = run(analysis_spec(P99), [{}], status=status)
    assert [m["name"] for m in status["metrics"]] == ["p99"]
    assert status["metrics"][0]["successes"] == 1


@pytest.mark.parametrize(
    ("status", "due"),
    [
        pytest.param(None, NOW + datetime.timedelta(seconds=30), id="initial-delay"),
        pytest.param({"metrics": [{"name": "m"}]}, NOW + datetime.timedelta(seconds=30), id="never-measured"),
        pytest.param({"metrics": [{"lastMeasuredAt": "2025-03-01T12:01:00Z"},
                                  {"lastMeasuredAt": "2025-03-01T12:02:00Z"}]},
                     NOW + datetime.timedelta(seconds=135), id="latest-plus-interval"),
        pytest.param({"metrics": [{"lastMeasuredAt": "garbage"}]}, NOW + datetime.timedelta(seconds=30),
                     id="malformed-time"),
    ],
)
def test_next_measurement_at(status: Mapping[str, Any] | None, due: datetime.datetime) -> None:
    assert analysis.build_next_measurement_at(status, analysis_spec(ERR), NOW) == due


# ---------------------------------------------------------------------------------------------------------------
# Queries


@pytest.mark.parametrize(
    ("builtin", "namespace_label", "expected"),
    [
        pytest.param(
            "errorRate", "namespace",
            '(sum(rate(shipyard_requests_total{namespace="ml",model="digits",version="1.4.0",code=~"5.."}[60s]))'
            ' or vector(0)) / sum(rate(shipyard_requests_total{namespace="ml",model="digits",version="1.4.0"}[60s]))',
            id="error-rate",
        ),
        pytest.param(
            "latencyP99", "namespace",
            "histogram_quantile(0.99, sum by (le) (rate(shipyard_request_duration_seconds_bucket"
            '{namespace="ml",model="digits",version="1.4.0"}[60s])))',
            id="latency-p99",
        ),
        pytest.param(
            "latencyP99", None,
            'histogram_quantile(0.99, sum by (le) (rate(shipyard_request_duration_seconds_bucket'
            '{model="digits",version="1.4.0"}[60s])))',
            id="without-namespace-label",
        ),
        pytest.param(
            "errorRate", "kubernetes_namespace",
            '(sum(rate(shipyard_requests_total{kubernetes_namespace="ml",model="digits",version="1.4.0",code=~"5.."}'
            '[60s])) or vector(0)) / sum(rate(shipyard_requests_total{kubernetes_namespace="ml",model="digits",'
            'version="1.4.0"}[60s]))',
            id="custom-namespace-label",
        ),
    ],
)
def test_builtin_queries(builtin: spec_mod.BuiltinMetric, namespace_label: str | None, expected: str) -> None:
    query = analysis.build_builtin_query(builtin, "ml", "digits", "1.4.0", "60s", namespace_label=namespace_label)
    assert query == expected
    assert contract.METRIC_REQUESTS_TOTAL in query or contract.METRIC_REQUEST_DURATION in query


def test_builtin_query_escapes_label_values() -> None:
    query = analysis.build_builtin_query("errorRate", "ml", 'a"b\\c', "1", "60s")
    assert 'model="a\\"b\\\\c"' in query


def test_unknown_builtin_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown builtin"):
        analysis.build_builtin_query("throughput", "ml", "m", "1", "60s")  # type: ignore[arg-type, unused-ignore]


@pytest.mark.parametrize(
    ("interval", "minimum", "window"),
    [
        pytest.param(15.0, 60.0, "60s", id="at-least-a-minute"),
        pytest.param(120.0, 60.0, "120s", id="interval"),
        pytest.param(2.5, 1.0, "3s", id="rounded-up"),
    ],
)
def test_query_window(interval: float, minimum: float, window: str) -> None:
    assert analysis.build_query_window(interval, minimum) == window


@pytest.mark.parametrize(
    ("template", "stable", "expected"),
    [
        pytest.param('x{namespace="{{namespace}}",model="{{name}}",version="{{version}}"}', "1.3",
                     'x{namespace="ml",model="digits",version="1.4"}', id="all-placeholders"),
        pytest.param('a{version="{{version}}"} / a{version="{{stableVersion}}"}', "1.3",
                     'a{version="1.4"} / a{version="1.3"}', id="stable-version"),
        pytest.param('a{version="{{stableVersion}}"}', None, 'a{version=""}', id="no-stable-version"),
        pytest.param("sum(up)", "1.3", "sum(up)", id="no-placeholders"),
        pytest.param("{{version}}{{version}}", "1.3", "1.41.4", id="repeated"),
        pytest.param("{{ version }} {{unknown}}", "1.3", "{{ version }} {{unknown}}", id="unknown-left-alone"),
    ],
)
def test_render_query(template: str, stable: str | None, expected: str) -> None:
    assert analysis.render_query(template, "ml", "digits", "1.4", stable) == expected


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        pytest.param('1"} or vector(1) #', '1\\"} or vector(1) #', id="quote-injection"),
        pytest.param("a\\b", "a\\\\b", id="backslash"),
        pytest.param("a\nb", "a\\nb", id="newline"),
        pytest.param("{{name}}", "{{name}}", id="placeholder-in-value-not-replaced"),
    ],
)
def test_render_query_escapes_values(value: str, escaped: str) -> None:
    assert analysis.render_query('v="{{version}}"', "ml", "digits", value, None) == f'v="{escaped}"'


# ---------------------------------------------------------------------------------------------------------------
# Histogram quantile (as Prometheus' histogram_quantile)

BUCKETS = [(0.1, 10.0), (0.2, 20.0), (0.5, 100.0), (INF, 100.0)]


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        pytest.param(0.99, BUCKETS, 0.2 + 0.3 * 79 / 80, id="p99-interpolated"),
        pytest.param(0.5, BUCKETS, 0.2 + 0.3 * 30 / 80, id="p50"),
        pytest.param(0.1, BUCKETS, 0.1, id="rank-at-bucket-edge"),
        pytest.param(0.05, BUCKETS, 0.05, id="first-bucket-from-zero"),
        pytest.param(1.0, BUCKETS, 0.2 + 0.3 * 80 / 80, id="q1"),
        pytest.param(0.0, BUCKETS, 0.0, id="q0"),
        pytest.param(0.0, [(0.1, 0.0), (0.2, 5.0), (INF, 5.0)], NAN, id="q0-empty-first-bucket-nan-as-prometheus"),
        pytest.param(0.99, [(0.1, 0.0), (0.5, 1.0), (INF, 10.0)], 0.5, id="rank-in-inf-bucket"),
        pytest.param(0.5, [(INF, 10.0), (0.5, 10.0), (0.1, 0.0)], 0.3, id="unsorted-input"),
        pytest.param(0.5, [(-1.0, 6.0), (0.0, 8.0), (INF, 10.0)], -1.0, id="negative-first-bound"),
        pytest.param(0.5, [(0.1, 5.0), (0.2, 4.0), (INF, 10.0)], 0.1, id="non-monotonic-forced"),
        pytest.param(0.5, [(0.1, 2.0), (0.1, 3.0), (1.0, 10.0), (INF, 10.0)], 0.1, id="equal-bounds-merged"),
        pytest.param(0.99, [(0.1, 0.0), (0.2, 0.0), (INF, 0.0)], NAN, id="no-observations"),
        pytest.param(0.99, [(0.1, 1.0), (0.2, 2.0)], NAN, id="no-inf-bucket"),
        pytest.param(0.99, [(INF, 5.0)], NAN, id="only-inf-bucket"),
        pytest.param(0.99, [], NAN, id="empty"),
        pytest.param(-0.1, BUCKETS, -INF, id="q-below-0"),
        pytest.param(1.1, BUCKETS, INF, id="q-above-1"),
        pytest.param(NAN, BUCKETS, NAN, id="q-nan"),
    ],
)
def test_histogram_quantile(q: float, buckets: Sequence[tuple[float, float]], expected: float) -> None:
    got = analysis.build_histogram_quantile(q, buckets)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected)


@given(
    counts=st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=10),
    q=st.floats(min_value=0.0, max_value=1.0),
)
def test_histogram_quantile_stays_within_its_bucket(counts: list[int], q: float) -> None:
    """For any histogram, the quantile lies in the bucket whose cumulative count first reaches the rank."""
    bounds = [0.001 * 2**i for i in range(len(counts))]
    cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
    buckets = [*zip(bounds, map(float, cumulative), strict=True), (INF, float(cumulative[-1]))]
    got = analysis.build_histogram_quantile(q, buckets)
    if cumulative[-1] == 0:
        assert math.isnan(got)
        return
    rank = q * cumulative[-1]
    b = next(i for i, c in enumerate(cumulative) if c >= rank)
    if counts[b] == 0:  # rank 0 in an empty bucket: 0/0, NaN in Prometheus too
        assert rank == 0 and math.isnan(got)
        return
    low = bounds[b - 1] if b > 0 else 0.0
    assert low - 1e-12 <= got <= bounds[b] + 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Direct scrape: increases with counter resets, error rate, latency


def key(name: str, **labels: str) -> analysis.SeriesKey:
    return analysis.build_series_key(name, labels)


REQ = contract.METRIC_REQUESTS_TOTAL
OK_SERIES = key(REQ, model="m", version="1", code="200")
ERR_SERIES = key(REQ, model="m", version="1", code="503")


def pod(ok: float, err: float | None = None, created: float | None = 100.0) -> dict[
        analysis.SeriesKey, analysis.SeriesSample]:
    out = {OK_SERIES: analysis.SeriesSample(ok, created)}
    if err is not None:
        out[ERR_SERIES] = analysis.SeriesSample(err, created)
    return out


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        pytest.param({"a": pod(10, 1)}, {"a": pod(25, 2)}, {OK_SERIES: 15, ERR_SERIES: 1}, id="increase"),
        pytest.param({"a": pod(10, 1), "b": pod(5, 0)}, {"a": pod(20, 1), "b": pod(8, 3)},
                     {OK_SERIES: 13, ERR_SERIES: 3}, id="summed-over-pods"),
        pytest.param({"a": pod(100, 9)}, {"a": pod(7, 1)}, {OK_SERIES: 7, ERR_SERIES: 1}, id="reset-value-dropped"),
        pytest.param({"a": pod(10, 1, created=100.0)}, {"a": pod(30, 2, created=200.0)},
                     {OK_SERIES: 30, ERR_SERIES: 2}, id="reset-created-changed"),
        pytest.param({"a": pod(10, 1, created=None)}, {"a": pod(30, 2, created=None)},
                     {OK_SERIES: 20, ERR_SERIES: 1}, id="no-created-timestamps"),
        pytest.param({"a": pod(10)}, {"a": pod(12, 4)}, {OK_SERIES: 2, ERR_SERIES: 4}, id="new-series-from-zero"),
        pytest.param({"a": pod(10, 1)}, {"a": pod(12, 1), "b": pod(3, 1)}, {OK_SERIES: 5, ERR_SERIES: 1},
                     id="new-pod-from-zero"),
        pytest.param({"a": pod(10, 1), "gone": pod(50, 50)}, {"a": pod(12, 1)}, {OK_SERIES: 2, ERR_SERIES: 0},
                     id="pod-gone"),
        pytest.param(None, {"a": pod(10, 1), "b": pod(5, 0)}, {OK_SERIES: 15, ERR_SERIES: 1},
                     id="first-snapshot-since-start"),
    ],
)
def test_series_increase(
    previous: Mapping[str, analysis.TargetSnapshot] | None,
    current: Mapping[str, analysis.TargetSnapshot],
    expected: Mapping[analysis.SeriesKey, float],
) -> None:
    assert analysis.build_series_increase(previous, current) == expected


@pytest.mark.parametrize(
    ("increase", "expected"),
    [
        pytest.param({OK_SERIES: 90.0, ERR_SERIES: 10.0}, 0.1, id="ten-percent"),
        pytest.param({OK_SERIES: 90.0}, 0.0, id="no-errors"),
        pytest.param({OK_SERIES: 0.0, ERR_SERIES: 0.0}, None, id="no-requests"),
        pytest.param({}, None, id="no-series"),
        pytest.param({ERR_SERIES: 4.0, key(REQ, model="m", version="1", code="429"): 4.0}, 0.5, id="4xx-not-errors"),
        pytest.param({key(REQ, code="500"): 1.0, key(REQ, code="504"): 1.0, key(REQ, code="200"): 2.0}, 0.5,
                     id="all-5xx"),
        pytest.param({OK_SERIES: 1.0, key("other_total", code="500"): 100.0}, 0.0, id="other-metrics-ignored"),
    ],
)
def test_error_rate(increase: Mapping[analysis.SeriesKey, float], expected: float | None) -> None:
    assert analysis.build_error_rate(increase) == expected


def buckets(counts: Mapping[str, float], **labels: str) -> dict[analysis.SeriesKey, float]:
    name = contract.METRIC_REQUEST_DURATION + "_bucket"
    return {key(name, le=le, **labels): c for le, c in counts.items()}


@pytest.mark.parametrize(
    ("increase", "expected"),
    [
        pytest.param(buckets({"0.1": 10, "0.2": 20, "0.5": 100, "+Inf": 100}), 0.2 + 0.3 * 79 / 80, id="p99"),
        pytest.param({**buckets({"0.1": 5, "0.5": 5, "+Inf": 5}, pod="a"),
                      **buckets({"0.1": 0, "0.5": 95, "+Inf": 95}, pod="b")},
                     0.1 + 0.4 * (99 - 5) / 95, id="summed-by-le"),
        pytest.param(buckets({"0.1": 0, "0.5": 0, "+Inf": 0}), None, id="no-requests"),
        pytest.param({}, None, id="no-series"),
        pytest.param(buckets({"0.1": 0, "bogus": 3, "+Inf": 10}), 0.1, id="malformed-le-skipped"),
    ],
)
def test_latency_quantile(increase: Mapping[analysis.SeriesKey, float], expected: float | None) -> None:
    got = analysis.build_latency_quantile(increase)
    assert got == (None if expected is None else pytest.approx(expected))


# ---------------------------------------------------------------------------------------------------------------
# Direct scrape: user scrape metrics

G = "shipyard_inflight_requests"
C = "jobs_total"


def snap(**pods: Mapping[analysis.SeriesKey, float]) -> dict[str, dict[analysis.SeriesKey, analysis.SeriesSample]]:
    return {p: {k: analysis.SeriesSample(v) for k, v in series.items()} for p, series in pods.items()}


GAUGES = snap(a={key(G, kind="x"): 2.0, key(G, kind="y"): 10.0}, b={key(G, kind="x"): 4.0})


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        pytest.param(spec_mod.ScrapeProvider(metric=G), 16.0, id="sum"),
        pytest.param(spec_mod.ScrapeProvider(metric=G, aggregation="avg"), 16.0 / 3, id="avg"),
        pytest.param(spec_mod.ScrapeProvider(metric=G, aggregation="max"), 10.0, id="max"),
        pytest.param(spec_mod.ScrapeProvider(metric=G, aggregation="min"), 2.0, id="min"),
        pytest.param(spec_mod.ScrapeProvider(metric=G, labels={"kind": "x"}), 6.0, id="label-filter"),
        pytest.param(spec_mod.ScrapeProvider(metric=G, labels={"kind": "z"}), None, id="no-match"),
        pytest.param(spec_mod.ScrapeProvider(metric="absent"), None, id="absent"),
    ],
)
def test_scrape_value(selector: spec_mod.ScrapeProvider, expected: float | None) -> None:
    got = analysis.build_scrape_value(selector, None, GAUGES, None)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("previous", "current", "elapsed", "expected"),
    [
        pytest.param(snap(a={key(C): 10.0}), snap(a={key(C): 40.0}), 15.0, 2.0, id="per-second"),
        pytest.param(snap(a={key(C): 10.0}, b={key(C): 0.0}), snap(a={key(C): 40.0}, b={key(C): 15.0}), 15.0, 3.0,
                     id="summed-over-pods"),
        pytest.param(snap(a={key(C): 100.0}), snap(a={key(C): 30.0}), 15.0, 2.0, id="reset"),
        pytest.param(snap(a={key(C): 10.0}), snap(a={key(C): 40.0}, b={key(C): 999.0}), 15.0, 2.0,
                     id="new-pod-left-out"),
        pytest.param(None, snap(a={key(C): 40.0}), None, None, id="first-measurement-no-data"),
        pytest.param(snap(a={key(C): 10.0}), snap(a={key(C): 40.0}), 0.0, None, id="no-elapsed-time"),
    ],
)
def test_scrape_rate(
    previous: Mapping[str, analysis.TargetSnapshot] | None,
    current: Mapping[str, analysis.TargetSnapshot],
    elapsed: float | None,
    expected: float | None,
) -> None:
    selector = spec_mod.ScrapeProvider(metric=C, rate=True)
    got = analysis.build_scrape_value(selector, previous, current, elapsed)
    assert got == (None if expected is None else pytest.approx(expected))
