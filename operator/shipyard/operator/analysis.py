"""Metric analysis of a candidate version: measurements -> Successful | Failed | Inconclusive | Error. Pure, no I/O.

The one evaluator, in the spirit of Argo Rollouts' ``evaluate.go``, for every provider: each metric of
``spec.rollout.analysis`` is measured by its provider module (``shipyard.operator.providers``: pulled by the shell
every ``interval``, or planned as a Job), for the candidate and, when the metric compares with it, for the stable;
the planner folds those measurements into compact per-metric counters kept in ``status.analysis``
(``build_analysis_status``) and this module judges them (``assess_analysis``). Nothing here reads a clock (``now``
is passed in), the network or Kubernetes; a restarted operator continues from the counters.

Verdict of one measurement (``evaluate_sample``):

- a verdict the provider decided itself (a Job's exit code: ``Sample.verdict``) stands;
- no data (``None`` or NaN; an empty Prometheus vector, no requests in the interval) -> the ``noData`` policy:
  ``Fail`` -> Failed, ``Inconclusive`` -> Inconclusive, ``Ignore`` -> Skipped (not counted at all);
- ``max``: Failed when value > max; ``min``: Failed when value < min (+-inf compare as numbers; +inf > any max);
- ``maxRelativeToStable = x``: Failed when candidate > max(stable, floor) x (1 + x). The floor keeps a near-zero
  stable from failing a near-zero candidate (0 errors vs 0.0001); each provider gives its own
  (``providers.build_relative_floor``: errorRate 0.001, latencyP99 0.005 s, 0.001 otherwise). The comparison is
  meant for "lower is better" metrics; a negative stable value is raised to the floor. A stable without data
  (None, NaN or infinite) cannot be compared: the measurement fails if an absolute threshold fails, else takes the
  ``noData`` policy. Without a stable version at all (the model's first version) the relative threshold is not
  applied.
- a provider error -> Error (counted against ``consecutiveErrorLimit``, never against ``failureLimit``).

Verdict of the analysis (``assess_analysis``), limits per metric as in Argo Rollouts:

- Failed when some metric has more than ``failureLimit`` failed measurements;
- Error when some metric has more than ``consecutiveErrorLimit`` Error measurements in a row (the planner treats
  it like Failed: the provider stayed broken past the limit);
- Inconclusive when some metric's latest measurement erred (within the limit: nothing is known about the candidate
  now, so counts from before the outage must not advance or promote it) or is currently without data (its last
  counted measurement Inconclusive): hold the step, neither promote nor roll back; it clears as soon as the metric
  measures again;
- Successful when every metric has at least ``minSamples`` successful measurements;
- Pending before the first measurement, else Running.

When measurements are due (``plan_due``): per metric, ``initialDelay`` after the analysis started, then
``interval`` after its previous measurement; a Job-measured metric is due again an interval after its Job finished.
"""

from __future__ import annotations

import datetime
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from shipyard.operator import spec as spec_mod

MAX_TEXT: Final = 4096  # maxLength of status.analysis.metrics[].query and .message in the CRD
METRIC_HISTORY_LIMIT: Final = 30  # measurements kept in status.analysis.metrics[].history (maxItems in the CRD)
TIMESTAMP_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"


class Phase(enum.StrEnum):
    """Verdict of a measurement (Successful, Failed, Inconclusive, Error, Skipped) or of an analysis run."""

    PENDING = "Pending"  # run: nothing measured yet; status verdict of a metric never measured
    RUNNING = "Running"  # run: measuring, no verdict yet
    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"
    ERROR = "Error"
    SKIPPED = "Skipped"  # measurement only: no data under noData: Ignore; never counted, never stored as verdict


@dataclass(frozen=True)
class Sample:
    """What a provider measured: a value, or no data (``value`` None, ``error`` None), or an error.

    ``query`` is the resolved PromQL query or a description of what was measured, shown in status. ``verdict``
    (with ``note``) is a verdict the provider decided itself, without a value to judge (a Job's exit code).
    """

    value: float | None
    query: str
    error: str | None = None
    verdict: Phase | None = None
    note: str = ""
    # counts measured beside the value, kept in the metric's status entry (``figures``): predictionAgreement's copies
    # by outcome on the stable's pods (compared, dropped, timeout, error) and compared rows
    figures: Mapping[str, float] | None = None

    @property
    def has_data(self) -> bool:
        return self.error is None and self.value is not None and not math.isnan(self.value)


@dataclass(frozen=True)
class Measurement:
    """One measurement of a metric: the candidate, and the stable when the metric compares with it.

    ``stable`` is None when the metric has no ``maxRelativeToStable`` or when there is no stable version.
    """

    candidate: Sample
    stable: Sample | None = None


@dataclass(frozen=True)
class Assessment:
    phase: Phase
    message: str


# ---------------------------------------------------------------------------------------------------------------
# One measurement


def build_relative_floor(metric: spec_mod.Metric) -> float:
    """The floor under the stable value in ``maxRelativeToStable`` comparisons: the metric's provider's."""
    from shipyard.operator import providers  # the registry imports this module (Sample): imported when used

    return providers.build_relative_floor(metric)


def evaluate_measurement(
    metric: spec_mod.Metric,
    candidate: float | None,
    stable: float | None,
    no_data: spec_mod.NoDataPolicy,
    *,
    has_stable: bool = True,
) -> tuple[Phase, str]:
    """Verdict and message of one measurement's values; ``has_stable=False``: no stable version to compare with."""
    return _evaluate(metric, candidate, stable, no_data, has_stable=has_stable, stable_error=None)


def evaluate_sample(
    metric: spec_mod.Metric, measurement: Measurement, no_data: spec_mod.NoDataPolicy
) -> tuple[Phase, str]:
    """Verdict of a measurement as the providers returned it: a provider error is an Error measurement.

    An error measuring the stable only matters when the comparison with it decides: a candidate without data
    takes the noData policy and a candidate failing an absolute threshold fails, whatever the stable did.
    """
    candidate, stable = measurement.candidate, measurement.stable
    if candidate.error is not None:
        return Phase.ERROR, f"candidate: {candidate.error}"
    if candidate.verdict is not None:
        return candidate.verdict, candidate.note
    return _evaluate(
        metric,
        candidate.value,
        None if stable is None else stable.value,
        no_data,
        has_stable=stable is not None,
        stable_error=None if stable is None else stable.error,
    )


def _evaluate(
    metric: spec_mod.Metric,
    candidate: float | None,
    stable: float | None,
    no_data: spec_mod.NoDataPolicy,
    *,
    has_stable: bool,
    stable_error: str | None,
) -> tuple[Phase, str]:
    if candidate is None or math.isnan(candidate):
        return _no_data(no_data, "no data")
    failed: list[str] = []
    passed: list[str] = []
    if metric.max is not None:
        (failed if candidate > metric.max else passed).append(
            f"{_fmt(candidate)} {'>' if candidate > metric.max else '<='} max {_fmt(metric.max)}")
    if metric.min is not None:
        (failed if candidate < metric.min else passed).append(
            f"{_fmt(candidate)} {'<' if candidate < metric.min else '>='} min {_fmt(metric.min)}")
    stable_missing = False
    if metric.max_relative_to_stable is not None:
        if not has_stable:
            passed.append("no stable version to compare with")
        elif stable_error is not None or stable is None or not math.isfinite(stable):
            stable_missing = True
        else:
            floor = build_relative_floor(metric)
            limit = max(stable, floor) * (1.0 + metric.max_relative_to_stable)
            basis = f"stable {_fmt(stable)}" if stable >= floor else f"floor {_fmt(floor)} (stable {_fmt(stable)})"
            text = f"{basis} x {_fmt(1.0 + metric.max_relative_to_stable)} = {_fmt(limit)}"
            if candidate > limit:
                failed.append(f"{_fmt(candidate)} > {text}")
            else:
                passed.append(f"{_fmt(candidate)} <= {text}")
    if failed:
        return Phase.FAILED, "; ".join(failed)
    if stable_error is not None and stable_missing:
        return Phase.ERROR, f"stable: {stable_error}"
    if stable_missing:
        return _no_data(no_data, f"{_fmt(candidate)} but no data for the stable version to compare with")
    return Phase.SUCCESSFUL, "; ".join(passed)


def _no_data(policy: spec_mod.NoDataPolicy, what: str) -> tuple[Phase, str]:
    if policy == "Fail":
        return Phase.FAILED, f"{what} (noData: Fail)"
    if policy == "Ignore":
        return Phase.SKIPPED, f"{what} (noData: Ignore, not counted)"
    return Phase.INCONCLUSIVE, f"{what} (noData: Inconclusive)"


# ---------------------------------------------------------------------------------------------------------------
# Per-metric counters (the items of status.analysis.metrics)

_COUNTERS: Final = ("successes", "failures", "inconclusive", "errors", "consecutiveErrors", "measurements")
_COUNTED: Final[Mapping[Phase, str]] = {
    Phase.SUCCESSFUL: "successes",
    Phase.FAILED: "failures",
    Phase.INCONCLUSIVE: "inconclusive",
    Phase.ERROR: "errors",
}


def build_empty_metric_result(metric: spec_mod.Metric) -> dict[str, Any]:
    """The status entry of a metric not measured yet (verdict Pending, counters 0)."""
    return {
        "name": metric.name,
        "provider": metric.provider_key,
        "query": "",
        "lastValue": None,
        "stableValue": None,
        "verdict": Phase.PENDING.value,
        "message": "",
        **dict.fromkeys(_COUNTERS, 0),
    }


def build_metric_result(
    previous: Mapping[str, Any] | None,
    metric: spec_mod.Metric,
    measurement: Measurement,
    no_data: spec_mod.NoDataPolicy,
    now: datetime.datetime,
) -> dict[str, Any]:
    """Folds one measurement into the metric's counters; returns a new JSON-serialisable status entry.

    A Skipped measurement (noData: Ignore) changes no counter except resetting ``consecutiveErrors`` (the
    provider answered) and keeps the previous verdict; its message says it was ignored. Every measurement, Skipped
    ones included, is appended to the entry's ``history`` (the last ``METRIC_HISTORY_LIMIT``).
    """
    phase, message = evaluate_sample(metric, measurement, no_data)
    return build_folded_result(previous, metric, measurement, phase, message, now)


def build_folded_result(
    previous: Mapping[str, Any] | None,
    metric: spec_mod.Metric,
    measurement: Measurement,
    phase: Phase,
    message: str,
    now: datetime.datetime,
) -> dict[str, Any]:
    """Folds an already evaluated measurement (``phase``, ``message``) into the counters of ``previous``."""
    result = build_empty_metric_result(metric)
    if previous is not None:
        for key in _COUNTERS:
            result[key] = _count(previous.get(key))
        verdict = previous.get("verdict")
        if verdict in {p.value for p in _COUNTED} | {Phase.PENDING.value}:
            result["verdict"] = verdict
    counter = _COUNTED.get(phase)
    if counter is not None:
        result[counter] += 1
        result["verdict"] = phase.value
    result["consecutiveErrors"] = result["consecutiveErrors"] + 1 if phase is Phase.ERROR else 0
    result["measurements"] = build_measurement_count(previous) + 1
    candidate, stable = measurement.candidate, measurement.stable
    result["query"] = _clip(candidate.query)
    result["lastValue"] = build_json_number(candidate.value) if candidate.error is None else None
    result["stableValue"] = (
        build_json_number(stable.value) if stable is not None and stable.error is None else None
    )
    result["message"] = _clip(message)
    figures = candidate.figures if candidate.figures is not None else (previous or {}).get("figures")
    if isinstance(figures, Mapping):
        result["figures"] = {str(k): float(v) for k, v in figures.items()
                             if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    result["lastMeasuredAt"] = build_timestamp(now)
    result["history"] = build_metric_history(previous, {
        "time": result["lastMeasuredAt"], "value": result["lastValue"], "stableValue": result["stableValue"],
        "verdict": phase.value})
    return result


def build_metric_history(previous: Mapping[str, Any] | None, sample: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``previous``'s recent measurements (``history``) with ``sample`` appended: the last
    ``METRIC_HISTORY_LIMIT``, oldest first. Entries that are not objects (a hand-edited status) are dropped."""
    before = (previous or {}).get("history")
    kept = [dict(h) for h in before if isinstance(h, Mapping)] if isinstance(before, list | tuple) else []
    return [*kept, dict(sample)][-METRIC_HISTORY_LIMIT:]


def build_measurement_count(result: Mapping[str, Any] | None) -> int:
    """Measurements folded into a metric's status entry, Skipped ones included (older entries: the counters)."""
    if result is None:
        return 0
    if "measurements" in result:
        return _count(result.get("measurements"))
    return sum(_count(result.get(k)) for k in ("successes", "failures", "inconclusive", "errors"))


def build_json_number(value: float | None) -> float | None:
    """A value storable in status: JSON (and the API server) has no NaN or infinity, so those become None."""
    return value if value is not None and math.isfinite(value) else None


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# The analysis run


def assess_analysis(
    results: Sequence[Mapping[str, Any]],
    failure_limit: int,
    consecutive_error_limit: int,
    min_samples: int,
) -> Assessment:
    """Verdict of the analysis from the per-metric counters (rules in the module docstring)."""
    if not results:
        return Assessment(Phase.SUCCESSFUL, "No metrics to analyse.")
    for result in results:
        failures = _count(result.get("failures"))
        if failures > failure_limit:
            return Assessment(
                Phase.FAILED,
                f"Metric {result.get('name')} failed {failures} time(s), more than failureLimit {failure_limit}: "
                f"{result.get('message', '')}",
            )
    for result in results:
        errors = _count(result.get("consecutiveErrors"))
        if errors > consecutive_error_limit:
            return Assessment(
                Phase.ERROR,
                f"Metric {result.get('name')} could not be measured {errors} time(s) in a row, more than "
                f"consecutiveErrorLimit {consecutive_error_limit}: {result.get('message', '')}",
            )
    if all(_count(r.get("successes")) == 0 and not r.get("lastMeasuredAt") for r in results):
        return Assessment(Phase.PENDING, "Waiting for the first measurement.")
    erred = [r for r in results if r.get("verdict") == Phase.ERROR.value]
    if erred:
        first = erred[0]
        return Assessment(Phase.INCONCLUSIVE, _clip(
            f"Metric {first.get('name')} could not be measured ({_count(first.get('consecutiveErrors'))} time(s) in "
            f"a row, consecutiveErrorLimit {consecutive_error_limit}): {first.get('message', '')}; holding."))
    without_data = [str(r.get("name")) for r in results if r.get("verdict") == Phase.INCONCLUSIVE.value]
    if without_data:
        return Assessment(Phase.INCONCLUSIVE, f"No data for {', '.join(without_data)}; holding.")
    short = [str(r.get("name")) for r in results if _count(r.get("successes")) < min_samples]
    if not short:
        return Assessment(Phase.SUCCESSFUL, f"All {len(results)} metric(s) passed at least {min_samples} time(s).")
    return Assessment(
        Phase.RUNNING, f"Waiting for {min_samples} successful measurement(s) of {', '.join(short)}."
    )


def build_analysis_status(
    previous: Mapping[str, Any] | None,
    analysis: spec_mod.Analysis,
    version: str,
    measurements: Mapping[str, Measurement],
    started_at: datetime.datetime,
    now: datetime.datetime,
) -> dict[str, Any]:
    """The new ``status.analysis``: ``previous`` with ``measurements`` (by metric name) folded in and assessed.

    A previous status of another version is discarded (counters start from zero); metrics without a measurement
    in this call keep their previous entry; metrics no longer in the spec are dropped. Once the run is Failed or
    Error its counters are frozen: later measurements are not folded in (the verdict cannot flap back).
    """
    same_version = previous is not None and previous.get("version") == version
    previous_by_name: dict[str, Mapping[str, Any]] = {}
    started = build_timestamp(started_at)
    if same_version and previous is not None:
        started = str(previous.get("startedAt") or started)
        for item in previous.get("metrics") or ():
            if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                previous_by_name[item["name"]] = item
        if previous.get("phase") in (Phase.FAILED.value, Phase.ERROR.value):
            measurements = {}
    results: list[dict[str, Any]] = []
    for metric in analysis.metrics:
        before = previous_by_name.get(metric.name)
        measurement = measurements.get(metric.name)
        if measurement is not None:
            results.append(build_metric_result(before, metric, measurement, analysis.no_data, now))
        elif before is not None:
            results.append({**build_empty_metric_result(metric), **dict(before)})
        else:
            results.append(build_empty_metric_result(metric))
    assessment = assess_analysis(results, analysis.failure_limit, analysis.consecutive_error_limit,
                                 analysis.min_samples)
    return {
        "version": version,
        "phase": assessment.phase.value,
        "startedAt": started,
        "detectionBoundSeconds": analysis.detection_bound_seconds,
        "message": _clip(assessment.message),
        "metrics": results,
    }


def build_metric_due_at(
    result: Mapping[str, Any] | None, analysis: spec_mod.Analysis, started_at: datetime.datetime
) -> datetime.datetime:
    """When a metric's next measurement is due: startedAt + initialDelay first, then its last one + interval."""
    measured = parse_timestamp(result.get("lastMeasuredAt")) if result is not None else None
    if measured is None:
        return started_at + datetime.timedelta(seconds=analysis.initial_delay_seconds)
    return measured + datetime.timedelta(seconds=analysis.interval_seconds)


def plan_due(
    previous: Mapping[str, Any] | None, analysis: spec_mod.Analysis, started_at: datetime.datetime,
    now: datetime.datetime,
) -> tuple[tuple[str, ...], datetime.datetime | None]:
    """(names of the metrics due now, when the next one not due yet will be), from ``status.analysis``.

    ``previous`` is the status of this version's analysis (None: it has not started). Once the run is Failed or
    Error nothing is measured any more.
    """
    if previous is not None and previous.get("phase") in (Phase.FAILED.value, Phase.ERROR.value):
        return (), None
    by_name = {str(item.get("name")): item for item in (previous or {}).get("metrics") or ()
               if isinstance(item, Mapping)}
    due: list[str] = []
    later: list[datetime.datetime] = []
    for metric in analysis.metrics:
        at = build_metric_due_at(by_name.get(metric.name), analysis, started_at)
        if at <= now:
            due.append(metric.name)
        else:
            later.append(at)
    return tuple(due), min(later) if later else None


def build_next_measurement_at(
    previous: Mapping[str, Any] | None, analysis: spec_mod.Analysis, started_at: datetime.datetime
) -> datetime.datetime:
    """When the next measurement of some metric is due (the earliest of the metrics' due times)."""
    by_name = {str(item.get("name")): item for item in (previous or {}).get("metrics") or ()
               if isinstance(item, Mapping)}
    return min(build_metric_due_at(by_name.get(m.name), analysis, started_at) for m in analysis.metrics)


def build_timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: object) -> datetime.datetime | None:
    """A status timestamp (RFC 3339, UTC), None when absent or malformed."""
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)


def _fmt(value: float) -> str:
    return f"{value:.6g}"
