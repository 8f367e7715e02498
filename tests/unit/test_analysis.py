"""The analysis evaluator: thresholds, noData, comparison with the stable, verdicts, folding and scheduling.

The providers' own arithmetic (PromQL, scrape increases, histogram quantiles) is in test_provider_queries.py."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from shipyard.operator import analysis
from shipyard.operator import spec as spec_mod
from shipyard.operator.analysis import Phase
from shipyard.operator.providers import prometheus
from shipyard.operator.providers import scrape as scrape_provider

NOW = datetime.datetime(2025, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
INF = math.inf
NAN = math.nan


def metric(
    max: float | None = None,
    min: float | None = None,
    rel: float | None = None,
    provider: dict[str, Any] | None = None,
    name: str = "m",
) -> spec_mod.Metric:
    return spec_mod.Metric(
        name=name,
        **(provider or {"prometheus": prometheus.Query(query='q{version="{{version}}"}')}),
        max=max,
        min=min,
        max_relative_to_stable=rel,
    )


ERROR_RATE: dict[str, Any] = {"builtin": "errorRate"}
LATENCY: dict[str, Any] = {"builtin": "latencyP99"}


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
    assert analysis.build_relative_floor(metric(rel=0.1)) == prometheus.DEFAULT_RELATIVE_FLOOR == 0.001
    scraped = {"scrape": scrape_provider.Scrape(metric="x")}
    assert analysis.build_relative_floor(metric(rel=0.1, provider=scraped)) == scrape_provider.DEFAULT_RELATIVE_FLOOR


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
        "errors": 0, "consecutiveErrors": 0, "measurements": 1, "lastMeasuredAt": "2025-03-01T12:00:00Z",
        "history": [{"time": "2025-03-01T12:00:00Z", "value": 0.2, "stableValue": 0.1, "verdict": "Failed"}],
    }
    assert "0.2 > stable 0.1" in result["message"]


def point(second: int, value: float | None, verdict: str, stable: float | None = None) -> dict[str, Any]:
    """One entry of status.analysis.metrics[].history, `second` seconds after NOW."""
    return {"time": analysis.build_timestamp(NOW + datetime.timedelta(seconds=second)), "value": value,
            "stableValue": stable, "verdict": verdict}


FULL = [point(i, float(i), "Successful") for i in range(analysis.METRIC_HISTORY_LIMIT)]


@pytest.mark.parametrize(
    ("previous", "spec", "measurement", "policy", "expected"),
    [
        pytest.param(None, metric(max=1), OK, "Fail", [point(99, 0.001, "Successful")], id="first-measurement"),
        pytest.param({"history": [point(1, 0.5, "Successful")]}, metric(max=1), analysis.Measurement(sample(2.0)),
                     "Fail", [point(1, 0.5, "Successful"), point(99, 2.0, "Failed")], id="appended-oldest-first"),
        pytest.param({"history": FULL}, metric(max=100), analysis.Measurement(sample(7.0)), "Fail",
                     [*FULL[1:], point(99, 7.0, "Successful")], id="bounded-drops-the-oldest"),
        pytest.param({"history": FULL + FULL}, metric(max=100), OK, "Fail",
                     [*FULL[1:], point(99, 0.001, "Successful")], id="over-long-previous-trimmed"),
        pytest.param(None, metric(rel=0.1), analysis.Measurement(sample(0.2), sample(0.1)), "Fail",
                     [point(99, 0.2, "Failed", stable=0.1)], id="with-the-stable-value"),
        pytest.param(None, metric(max=1), analysis.Measurement(analysis.Sample(None, "q", error="down")), "Fail",
                     [point(99, None, "Error")], id="error-has-no-value"),
        pytest.param(None, metric(max=1), analysis.Measurement(sample(None)), "Ignore",
                     [point(99, None, "Skipped")], id="ignored-no-data-is-recorded-as-skipped"),
        pytest.param(None, metric(max=1), analysis.Measurement(sample(NAN)), "Inconclusive",
                     [point(99, None, "Inconclusive")], id="nan-stored-as-null"),
        pytest.param(None, metric(max=1), analysis.Measurement(sample(INF)), "Fail",
                     [point(99, None, "Failed")], id="infinite-stored-as-null"),
        pytest.param({"history": "garbage"}, metric(max=1), OK, "Fail", [point(99, 0.001, "Successful")],
                     id="garbage-previous-history-ignored"),
        pytest.param({"history": [7, point(1, 0.5, "Successful")]}, metric(max=1), OK, "Fail",
                     [point(1, 0.5, "Successful"), point(99, 0.001, "Successful")], id="non-object-entries-dropped"),
    ],
)
def test_fold_appends_to_the_bounded_history(
    previous: Mapping[str, Any] | None, spec: spec_mod.Metric, measurement: analysis.Measurement,
    policy: spec_mod.NoDataPolicy, expected: list[dict[str, Any]],
) -> None:
    result = analysis.build_metric_result(previous, spec, measurement, policy,
                                          NOW + datetime.timedelta(seconds=99))
    assert result["history"] == expected
    assert len(result["history"]) <= analysis.METRIC_HISTORY_LIMIT
    json.dumps(result, allow_nan=False)


def test_history_survives_a_pass_without_measurement_and_resets_with_the_version() -> None:
    spec = spec_mod.Analysis(metrics=(metric(max=1),))
    first = analysis.build_analysis_status(None, spec, "1.1.0", {"m": OK}, NOW, NOW)
    later = analysis.build_analysis_status(first, spec, "1.1.0", {}, NOW, NOW + datetime.timedelta(seconds=5))
    assert later["metrics"][0]["history"] == [point(0, 0.001, "Successful")]
    other = analysis.build_analysis_status(later, spec, "1.2.0", {"m": OK}, NOW, NOW + datetime.timedelta(seconds=9))
    assert other["metrics"][0]["history"] == [point(9, 0.001, "Successful")]


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
        pytest.param([result(errors=4, consecutive=4, verdict="Error")], 1, 4, 1, Phase.INCONCLUSIVE,
                     id="errors-at-limit-tolerated-but-hold"),
        pytest.param([result(successes=3), result("n", successes=3, errors=1, consecutive=1, verdict="Error")], 1, 4,
                     1, Phase.INCONCLUSIVE, id="an-erring-metric-holds-a-passing-analysis"),
        pytest.param([result(successes=3), result("n", successes=3, errors=1, consecutive=0)], 1, 4, 1,
                     Phase.SUCCESSFUL, id="an-error-since-recovered-does-not-hold"),
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


JOB = {"job": {"template": {"spec": {"containers": [{"name": "e"}]}}, "activeDeadlineSeconds": 120}}


@pytest.mark.parametrize(
    ("initial_delay", "failure_limit", "interval", "job", "bound"),
    [
        pytest.param(0.0, 0, 30.0, False, 30.0, id="defaults-limit0"),
        pytest.param(0.0, 1, 30.0, False, 60.0, id="default-limit1"),
        pytest.param(60.0, 2, 15.0, False, 105.0, id="delay-limit2"),
        pytest.param(10.0, 100, 1.0, False, 111.0, id="fast"),
        pytest.param(0.0, 1, 10.0, True, 2 * (10.0 + 120.0), id="a-job-metric-adds-its-deadline"),
    ],
)
def test_detection_bound(initial_delay: float, failure_limit: int, interval: float, job: bool, bound: float) -> None:
    metrics = (metric(max=1),) + ((metric(min=0.9, name="accuracy", provider=JOB),) if job else ())
    spec = spec_mod.Analysis(metrics=metrics, interval=f"{interval:g}s", initial_delay=f"{initial_delay:g}s",
                             failure_limit=failure_limit)
    assert spec.detection_bound_seconds == bound
    status = analysis.build_analysis_status(None, spec, "1.1", {}, NOW, NOW)
    assert status["detectionBoundSeconds"] == bound  # what status shows is the spec's rule


# ---------------------------------------------------------------------------------------------------------------
# status.analysis over time


def analysis_spec(*metrics: spec_mod.Metric, failure_limit: int = 1, min_samples: int = 2,
                  no_data: spec_mod.NoDataPolicy = "Inconclusive") -> spec_mod.Analysis:
    return spec_mod.Analysis(metrics=metrics, interval="15s", initial_delay="30s", failure_limit=failure_limit,
                             min_samples=min_samples, no_data=no_data)


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
        pytest.param([{"error-rate": DOWN, "p99": OK}] * 4, "Inconclusive", id="errors-tolerated-hold"),
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


T = "2025-03-01T12:{:02d}:00Z".format


@pytest.mark.parametrize(
    ("status", "now", "due", "next_due"),
    [
        pytest.param(None, NOW, (), NOW + datetime.timedelta(seconds=30), id="initial-delay"),
        pytest.param(None, NOW + datetime.timedelta(seconds=30), ("error-rate", "p99"), None, id="first-due"),
        pytest.param({"metrics": [{"name": "error-rate"}]}, NOW, (), NOW + datetime.timedelta(seconds=30),
                     id="never-measured"),
        pytest.param({"metrics": [{"name": "error-rate", "lastMeasuredAt": T(1)},
                                  {"name": "p99", "lastMeasuredAt": T(2)}]},
                     NOW + datetime.timedelta(seconds=80), ("error-rate",), NOW + datetime.timedelta(seconds=135),
                     id="each-metric-on-its-own-schedule"),
        pytest.param({"metrics": [{"name": "error-rate", "lastMeasuredAt": "garbage"}]}, NOW, (),
                     NOW + datetime.timedelta(seconds=30), id="malformed-time"),
        pytest.param({"phase": "Failed", "metrics": []}, NOW + datetime.timedelta(hours=1), (), None,
                     id="failed-measures-nothing"),
    ],
)
def test_plan_due(status: Mapping[str, Any] | None, now: datetime.datetime, due: tuple[str, ...],
                  next_due: datetime.datetime | None) -> None:
    assert analysis.plan_due(status, analysis_spec(ERR, P99), NOW, now) == (due, next_due)
    if status is None or status.get("phase") != "Failed":
        earliest = min([now + datetime.timedelta(seconds=15)] if due else [], default=next_due)
        assert analysis.build_next_measurement_at(status, analysis_spec(ERR, P99), NOW) <= (earliest or now)



