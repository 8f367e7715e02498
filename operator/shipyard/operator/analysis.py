"""Metric analysis of a candidate version: measurements -> Successful | Failed | Inconclusive | Error. Pure, no I/O.

One shared evaluator, in the spirit of Argo Rollouts' ``evaluate.go``: every ``interval`` the shell measures each
metric of ``spec.rollout.analysis`` through ``providers`` (for the candidate, and for the stable version when the
metric compares with it), and the planner folds those measurements into compact per-metric counters kept in
``status.analysis`` (see ``build_analysis_status``), then asks ``assess_analysis`` for the verdict. Nothing here
reads a clock (``now`` is passed in), the network or Kubernetes; a restarted operator continues from the counters.

Verdict of one measurement (``evaluate_measurement``):

- no data (``None`` or NaN; an empty Prometheus vector, no requests in the interval) -> the ``noData`` policy:
  ``Fail`` -> Failed, ``Inconclusive`` -> Inconclusive, ``Ignore`` -> Skipped (not counted at all);
- ``max``: Failed when value > max; ``min``: Failed when value < min (+-inf compare as numbers; +inf > any max);
- ``maxRelativeToStable = x``: Failed when candidate > max(stable, floor) x (1 + x). The floor keeps a near-zero
  stable from failing a near-zero candidate (0 errors vs 0.0001): ``RELATIVE_FLOORS`` per builtin (errorRate
  0.001 = one error in a thousand requests; latencyP99 0.005 s, the resolution of the latency histogram's low
  buckets), ``DEFAULT_RELATIVE_FLOOR`` (0.001) for prometheus/scrape metrics. The comparison is meant for
  "lower is better" metrics; a negative stable value is raised to the floor. A stable without data (None, NaN or
  infinite) cannot be compared: the measurement fails if an absolute threshold fails, else takes the ``noData``
  policy. Without a stable version at all (the model's first version) the relative threshold is not applied.
- a provider error -> Error (counted against ``consecutiveErrorLimit``, never against ``failureLimit``).

Verdict of the analysis (``assess_analysis``), limits per metric as in Argo Rollouts:

- Failed when some metric has more than ``failureLimit`` failed measurements;
- Error when some metric has more than ``consecutiveErrorLimit`` Error measurements in a row (the planner treats
  it like Failed: the provider stayed broken past the limit);
- Successful when every metric has at least ``minSamples`` successful measurements and none is currently without
  data (its last counted measurement Inconclusive);
- Inconclusive when that last condition alone blocks success (no data: hold the step, neither promote nor roll
  back; it clears as soon as the metric measures again);
- Pending before the first measurement, else Running.

Direct scrape (no Prometheus): ``build_series_increase`` turns two snapshots of the pods' counters (previous and
current, per pod, with Prometheus' counter-reset rule applied per series) into increases summed over the pods;
``build_error_rate`` and ``build_latency_quantile`` (``histogram_quantile`` as Prometheus computes it) read them.
"""

from __future__ import annotations

import datetime
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from shipyard import contract
from shipyard.operator import spec as spec_mod

RELATIVE_FLOORS: Final[Mapping[str, float]] = {"errorRate": 0.001, "latencyP99": 0.005}
DEFAULT_RELATIVE_FLOOR: Final = 0.001
LATENCY_QUANTILE: Final = 0.99
DEFAULT_MIN_WINDOW_SECONDS: Final = 60.0
MAX_TEXT: Final = 4096  # maxLength of status.analysis.metrics[].query and .message in the CRD
ERROR_CODE_PREFIX: Final = "5"  # errorRate = share of 5xx responses
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

    ``query`` is the resolved PromQL query or a description of the scrape, shown in status.
    """

    value: float | None
    query: str
    error: str | None = None

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
    """The floor under the stable value in ``maxRelativeToStable`` comparisons (see the module docstring)."""
    if isinstance(metric.provider, spec_mod.BuiltinProvider):
        return RELATIVE_FLOORS.get(metric.provider.metric, DEFAULT_RELATIVE_FLOOR)
    return DEFAULT_RELATIVE_FLOOR


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

_COUNTERS: Final = ("successes", "failures", "inconclusive", "errors", "consecutiveErrors")
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
        "provider": metric.provider.kind,
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
    provider answered) and keeps the previous verdict; its message says it was ignored.
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
    candidate, stable = measurement.candidate, measurement.stable
    result["query"] = _clip(candidate.query)
    result["lastValue"] = build_json_number(candidate.value) if candidate.error is None else None
    result["stableValue"] = (
        build_json_number(stable.value) if stable is not None and stable.error is None else None
    )
    result["message"] = _clip(message)
    result["lastMeasuredAt"] = build_timestamp(now)
    return result


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
    without_data = [str(r.get("name")) for r in results if r.get("verdict") == Phase.INCONCLUSIVE.value]
    short = [str(r.get("name")) for r in results if _count(r.get("successes")) < min_samples]
    if not short and not without_data:
        return Assessment(Phase.SUCCESSFUL, f"All {len(results)} metric(s) passed at least {min_samples} time(s).")
    if without_data:
        return Assessment(Phase.INCONCLUSIVE, f"No data for {', '.join(without_data)}; holding.")
    return Assessment(
        Phase.RUNNING, f"Waiting for {min_samples} successful measurement(s) of {', '.join(short)}."
    )


def build_detection_bound_seconds(initial_delay: float, failure_limit: int, interval: float) -> float:
    """Worst-case time from a failing candidate to a Failed analysis: initialDelay + (failureLimit + 1) x interval."""
    return initial_delay + (failure_limit + 1) * interval


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
        "detectionBoundSeconds": build_detection_bound_seconds(
            analysis.initial_delay_seconds, analysis.failure_limit, analysis.interval_seconds),
        "message": _clip(assessment.message),
        "metrics": results,
    }


def build_next_measurement_at(
    previous: Mapping[str, Any] | None, analysis: spec_mod.Analysis, started_at: datetime.datetime
) -> datetime.datetime:
    """When the next measurement is due: startedAt + initialDelay first, then the last measurement + interval."""
    last: datetime.datetime | None = None
    if previous is not None:
        for item in previous.get("metrics") or ():
            if isinstance(item, Mapping):
                measured = parse_timestamp(item.get("lastMeasuredAt"))
                if measured is not None and (last is None or measured > last):
                    last = measured
    if last is None:
        return started_at + datetime.timedelta(seconds=analysis.initial_delay_seconds)
    return last + datetime.timedelta(seconds=analysis.interval_seconds)


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


# ---------------------------------------------------------------------------------------------------------------
# PromQL


def build_label_value(value: str) -> str:
    """``value`` escaped for the inside of a double-quoted PromQL string literal."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def build_selector(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{build_label_value(v)}"' for k, v in labels.items()) + "}"


def build_query_window(interval_seconds: float, minimum_seconds: float = DEFAULT_MIN_WINDOW_SECONDS) -> str:
    """The range of ``rate()`` in builtin queries: the analysis interval, at least ``minimum_seconds``.

    ``rate`` needs two scrapes inside its range; a minute covers four scrapes at Prometheus' usual 15 s.
    """
    return f"{math.ceil(max(interval_seconds, minimum_seconds))}s"


def build_builtin_query(
    builtin: spec_mod.BuiltinMetric,
    namespace: str,
    name: str,
    version: str,
    window: str,
    *,
    namespace_label: str | None = "namespace",
) -> str:
    """PromQL of a builtin metric for one version of a model.

    ``name`` is the value of the runtime's ``model`` label; ``namespace_label`` is the target label that the
    Prometheus scrape configuration puts the pod's namespace in (``namespace`` with the Prometheus Operator and
    the usual kubernetes_sd relabelling); None leaves the namespace out of the selector.

    errorRate: the 5xx share of ``shipyard_requests_total`` (``or vector(0)``: no 5xx series is 0, not no data;
    no requests at all is no data). latencyP99: ``histogram_quantile(0.99, ...)`` of the request duration (no
    requests: NaN, i.e. no data).
    """
    labels: dict[str, str] = {}
    if namespace_label:
        labels[namespace_label] = namespace
    labels[contract.LABEL_MODEL] = name
    labels[contract.LABEL_VERSION] = version
    selector = build_selector(labels)
    if builtin == "errorRate":
        errors = selector[:-1] + f',{contract.LABEL_CODE}=~"{ERROR_CODE_PREFIX}.."' + "}"
        total = contract.METRIC_REQUESTS_TOTAL
        return (f"(sum(rate({total}{errors}[{window}])) or vector(0))"
                f" / sum(rate({total}{selector}[{window}]))")
    if builtin == "latencyP99":
        return (f"histogram_quantile({LATENCY_QUANTILE}, sum by (le) "
                f"(rate({contract.METRIC_REQUEST_DURATION}_bucket{selector}[{window}])))")
    raise ValueError(f"unknown builtin metric {builtin!r}")


def render_query(template: str, namespace: str, name: str, version: str, stable_version: str | None) -> str:
    """A user's PromQL template with ``{{namespace}}``, ``{{name}}``, ``{{version}}``, ``{{stableVersion}}`` replaced.

    Values are escaped for a double-quoted PromQL string (``version="{{version}}"``); no stable version renders
    as the empty string (such a selector matches nothing: no data).
    """
    values = {
        "{{namespace}}": namespace,
        "{{name}}": name,
        "{{version}}": version,
        "{{stableVersion}}": stable_version or "",
    }
    out: list[str] = []
    i = 0
    while i < len(template):  # one pass, so that a replaced value is never replaced again
        for placeholder, value in values.items():
            if template.startswith(placeholder, i):
                out.append(build_label_value(value))
                i += len(placeholder)
                break
        else:
            out.append(template[i])
            i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Direct scrape: pure computation over parsed samples

SeriesKey: TypeAlias = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted (label, value) pairs


@dataclass(frozen=True)
class SeriesSample:
    """One scraped sample; ``created`` is the ``_created`` timestamp of its series when exported (resets)."""

    value: float
    created: float | None = None


TargetSnapshot: TypeAlias = Mapping[SeriesKey, SeriesSample]  # one pod's samples


def build_series_key(name: str, labels: Mapping[str, str]) -> SeriesKey:
    return name, tuple(sorted(labels.items()))


def build_target_increases(
    previous: Mapping[str, TargetSnapshot] | None, current: Mapping[str, TargetSnapshot]
) -> dict[tuple[str, SeriesKey], float]:
    """Increase of each counter series of each target (pod) since ``previous``.

    Per series as Prometheus' ``increase``: current - previous, or the whole current value after a counter reset
    (the value went down, or the series' ``_created`` timestamp changed: the pod restarted). A series or a pod
    absent from ``previous`` (a new pod, a first 5xx, or no previous snapshot at all) counts from zero: its
    counters started after the previous snapshot, or, for the first snapshot, at the pod's start.
    """
    out: dict[tuple[str, SeriesKey], float] = {}
    for target, series in current.items():
        before = previous.get(target, {}) if previous is not None else {}
        for key, sample in series.items():
            old = before.get(key)
            reset = old is None or sample.value < old.value or (
                sample.created is not None and old.created is not None and sample.created != old.created)
            out[(target, key)] = sample.value if reset or old is None else sample.value - old.value
    return out


def build_series_increase(
    previous: Mapping[str, TargetSnapshot] | None, current: Mapping[str, TargetSnapshot]
) -> dict[SeriesKey, float]:
    """``build_target_increases`` summed over the targets (pods), by series."""
    out: dict[SeriesKey, float] = {}
    for (_target, key), value in build_target_increases(previous, current).items():
        out[key] = out.get(key, 0.0) + value
    return out


def _matches(labels: Iterable[tuple[str, str]], wanted: Mapping[str, str]) -> bool:
    have = dict(labels)
    return all(have.get(k) == v for k, v in wanted.items())


def build_error_rate(increase: Mapping[SeriesKey, float], labels: Mapping[str, str] | None = None) -> float | None:
    """Share of 5xx in the increase of ``shipyard_requests_total`` (series matching ``labels``); None: no requests."""
    total = errors = 0.0
    for (name, series_labels), value in increase.items():
        if name != contract.METRIC_REQUESTS_TOTAL or not _matches(series_labels, labels or {}):
            continue
        total += value
        if dict(series_labels).get(contract.LABEL_CODE, "").startswith(ERROR_CODE_PREFIX):
            errors += value
    return errors / total if total > 0 else None


def build_histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Quantile ``q`` of a histogram given as (upper bound, cumulative count) pairs, as Prometheus computes it.

    Linear interpolation inside the bucket holding the rank (the first bucket starts at 0 unless its bound is
    <= 0); a rank in the +Inf bucket gives the highest finite bound; NaN without a +Inf bucket, with fewer than
    two buckets or without observations; counts are forced monotonic; equal bounds are merged.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    if not ordered or not math.isinf(ordered[-1][0]) or ordered[-1][0] < 0:
        return math.nan
    if len(ordered) < 2:
        return math.nan
    monotonic: list[tuple[float, float]] = []
    highest = 0.0
    for bound, count in ordered:
        highest = max(highest, count)
        monotonic.append((bound, highest))
    observations = monotonic[-1][1]
    if observations <= 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(monotonic) - 1) if monotonic[i][1] >= rank), len(monotonic) - 1)
    if b == len(monotonic) - 1:
        return monotonic[-2][0]
    if b == 0 and monotonic[0][0] <= 0:
        return monotonic[0][0]
    start, (end, count) = 0.0, monotonic[b]
    if b > 0:
        start = monotonic[b - 1][0]
        count -= monotonic[b - 1][1]
        rank -= monotonic[b - 1][1]
    if count <= 0:  # rank 0 in an empty bucket: 0/0, NaN in Prometheus (Go divides without raising)
        return math.nan
    return start + (end - start) * (rank / count)


def build_latency_quantile(
    increase: Mapping[SeriesKey, float],
    q: float = LATENCY_QUANTILE,
    labels: Mapping[str, str] | None = None,
    metric: str = contract.METRIC_REQUEST_DURATION,
) -> float | None:
    """Quantile ``q`` of the ``<metric>_bucket`` increases matching ``labels``, summed by ``le``; None: no data."""
    by_le: dict[float, float] = {}
    bucket_name = metric + "_bucket"
    for (name, series_labels), value in increase.items():
        if name != bucket_name or not _matches(series_labels, labels or {}):
            continue
        le = dict(series_labels).get("le")
        try:
            bound = float(le) if le is not None else math.nan
        except ValueError:
            continue
        if not math.isnan(bound):
            by_le[bound] = by_le.get(bound, 0.0) + value
    value = build_histogram_quantile(q, by_le.items())
    return None if math.isnan(value) else value


def build_scrape_value(
    selector: spec_mod.ScrapeProvider,
    previous: Mapping[str, TargetSnapshot] | None,
    current: Mapping[str, TargetSnapshot],
    elapsed_seconds: float | None,
) -> float | None:
    """Value of a ``scrape`` metric: the matching samples of every pod, aggregated (sum, avg, max, min).

    With ``rate``, each series' per-second increase since ``previous`` (Prometheus' reset rule) is aggregated
    instead; series or pods absent from ``previous`` are left out, and without a previous snapshot (first
    measurement, or after an operator restart) there is no data. None: no matching sample.
    """
    values: list[float] = []
    if selector.rate:
        if previous is None or elapsed_seconds is None or elapsed_seconds <= 0:
            return None
        for (target, key), increase in build_target_increases(previous, current).items():
            if key[0] == selector.metric and _matches(key[1], selector.labels) and key in previous.get(target, {}):
                values.append(increase / elapsed_seconds)
    else:
        for series in current.values():
            for (name, labels), sample in series.items():
                if name == selector.metric and _matches(labels, selector.labels):
                    values.append(sample.value)
    if not values:
        return None
    if selector.aggregation == "avg":
        return sum(values) / len(values)
    if selector.aggregation == "max":
        return max(values)
    if selector.aggregation == "min":
        return min(values)
    return sum(values)


def _fmt(value: float) -> str:
    return f"{value:.6g}"
