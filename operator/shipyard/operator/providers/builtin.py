"""The ``builtin`` metric provider: the runtime's own request metrics, errorRate and latencyP99. Does I/O (HTTP).

Spec fragment ``metrics[].builtin: errorRate | latencyP99``. Measured from Prometheus when an address applies
(``spec.rollout.analysis.prometheus.address``, else the operator's ``--prometheus-address``): ``rate`` over the
interval (at least a minute) of ``shipyard_requests_total`` / ``shipyard_request_duration_seconds`` of the version;
else by scraping the version's pods directly (a pod absent from the previous snapshot counts from zero, so the first
measurement of a version covers its pods' lifetime so far).

errorRate: the 5xx share (no 5xx series is 0, no requests at all is no data). latencyP99: the 99th percentile of
the request duration histogram (no requests: no data). In ``maxRelativeToStable`` comparisons the stable's value
is raised to a floor (``RELATIVE_FLOORS``), so that a near-zero stable does not fail a near-zero candidate.

With another serving runtime (``spec.serving.runtime``) each builtin follows the runtime's metric mapping
(``runtimes.RuntimeMetrics``: errors / total counters, or a histogram's p99 converted to seconds), and since such a
runtime does not label its metrics with the model and version, the version is its pods: scraped directly (the
runtime's metrics port and path), or in Prometheus ``{<namespace label>="<ns>", pod=~"<its Deployment's pods>"}``
(``runtimes.build_pod_regex``). A runtime that does not export the mapped metrics gives no data (``noData``
decides).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar, Final, Literal, TypeAlias

from shipyard import contract
from shipyard.operator import analysis, naming, runtimes
from shipyard.operator.providers import base, prometheus, scrape

if TYPE_CHECKING:
    from shipyard.operator import spec as spec_mod

Builtin: TypeAlias = Literal["errorRate", "latencyP99", "ttftP99", "tpotP99", "predictionAgreement"]
BUILTINS: Final[tuple[Builtin, ...]] = ("errorRate", "latencyP99", "ttftP99", "tpotP99", "predictionAgreement")
PREDICTION_AGREEMENT: Final = "predictionAgreement"  # measured on the stable's pods, about the candidate
# errorRate 0.001 = one error in a thousand requests; latencyP99 0.005 s, the resolution of the latency histogram's
# low buckets (and of the LLM servers' token timing histograms).
RELATIVE_FLOORS: Final[Mapping[str, float]] = {"errorRate": 0.001, "latencyP99": 0.005, "ttftP99": 0.005,
                                               "tpotP99": 0.005}


def build_query_window(interval_seconds: float, minimum_seconds: float) -> str:
    """The range of ``rate()`` in builtin queries: the analysis interval, at least ``minimum_seconds``.

    ``rate`` needs two scrapes inside its range; a minute covers four scrapes at Prometheus' usual 15 s.
    """
    return f"{math.ceil(max(interval_seconds, minimum_seconds))}s"


def build_builtin_query(builtin: Builtin, namespace: str, name: str, version: str, window: str, *,
                        namespace_label: str | None = "namespace") -> str:
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
    selector = prometheus.build_selector(labels)
    if builtin == "errorRate":
        errors = selector[:-1] + f',{contract.LABEL_CODE}=~"{scrape.ERROR_CODE_PREFIX}.."' + "}"
        total = contract.METRIC_REQUESTS_TOTAL
        return (f"(sum(rate({total}{errors}[{window}])) or vector(0))"
                f" / sum(rate({total}{selector}[{window}]))")
    if builtin == "latencyP99":
        return (f"histogram_quantile({scrape.LATENCY_QUANTILE}, sum by (le) "
                f"(rate({contract.METRIC_REQUEST_DURATION}_bucket{selector}[{window}])))")
    raise ValueError(f"unknown builtin metric {builtin!r}")


SHADOW_FIGURES: Final = {"compared": "compared", "dropped": "dropped", "timeout": "timeouts", "error": "errors"}


def _shadow_labels(namespace: str, name: str, candidate: str, stable: str | None,
                   namespace_label: str | None) -> dict[str, str]:
    """The labels of the shadow counters of the copies the stable's pods (version ``stable``: only they copy; None
    leaves the version out) sent to ``candidate``."""
    labels = {namespace_label: namespace} if namespace_label else {}
    labels[contract.LABEL_MODEL] = name
    if stable is not None:
        labels[contract.LABEL_VERSION] = stable
    labels[contract.LABEL_CANDIDATE] = candidate
    return labels


def build_agreement_query(namespace: str, name: str, candidate: str, window: str, *, stable: str | None = None,
                          namespace_label: str | None = "namespace") -> str:
    """PromQL of predictionAgreement: the rate of agreeing rows over that of compared rows of the copies the stable's
    pods sent to ``candidate`` (docs/shadow.md); no compared row in the window is an empty result (no data)."""
    selector = prometheus.build_selector(_shadow_labels(namespace, name, candidate, stable, namespace_label))
    return (f"sum(rate({contract.METRIC_SHADOW_AGREEING_ROWS}{selector}[{window}]))"
            f" / sum(rate({contract.METRIC_SHADOW_ROWS}{selector}[{window}]))")


def build_shadow_count_query(namespace: str, name: str, candidate: str, outcome: str, *, stable: str | None = None,
                             namespace_label: str | None = "namespace") -> str:
    """PromQL of the copies to ``candidate`` with ``outcome`` so far, summed over the stable's pods (the counters count
    from the start of shadowing to that candidate: the runtime drops a candidate's series when shadowing to it ends).
    """
    selector = prometheus.build_selector({**_shadow_labels(namespace, name, candidate, stable, namespace_label),
                                          contract.LABEL_OUTCOME: outcome})
    return f"sum({contract.METRIC_SHADOW_REQUESTS}{selector})"


def build_shadow_figures(current: Mapping[str, scrape.TargetSnapshot], labels: Mapping[str, str]) -> dict[str, float]:
    """The copies by outcome (compared, dropped, timeouts, errors) and compared rows so far, summed over the scraped
    pods (current counter values of the series matching ``labels``). Pure."""
    figures = dict.fromkeys((*SHADOW_FIGURES.values(), "rows"), 0.0)
    for series in current.values():
        for (sample, pairs), value in series.items():
            found = dict(pairs)
            if any(found.get(k) != v for k, v in labels.items()):
                continue
            if sample == contract.METRIC_SHADOW_REQUESTS and found.get(contract.LABEL_OUTCOME) in SHADOW_FIGURES:
                figures[SHADOW_FIGURES[found[contract.LABEL_OUTCOME]]] += value.value
            elif sample == contract.METRIC_SHADOW_ROWS:
                figures["rows"] += value.value
    return figures


def build_matchers(exact: Mapping[str, str], regex: Mapping[str, str]) -> str:
    """A PromQL selector: ``label="value"`` for ``exact``, ``label=~"regex"`` for ``regex``."""
    parts = [f'{k}="{prometheus.build_label_value(v)}"' for k, v in exact.items()]
    parts += [f'{k}=~"{prometheus.build_label_value(v)}"' for k, v in regex.items()]
    return "{" + ",".join(parts) + "}"


def build_mapped_query(builtin: Builtin, mapping: runtimes.ErrorRateMapping | runtimes.QuantileMapping,
                       namespace: str, deployment: str, window: str, *,
                       namespace_label: str | None = "namespace") -> str:
    """PromQL of a builtin of another runtime for one version: its mapping over the series of the version's pods
    (``pod`` label, ``runtimes.build_pod_regex``), in the namespace.

    errorRate: the sums of the errors' and of the totals' rates (each ``or vector(0)``: no series counts 0), so that
    no requests at all is 0/0, NaN, no data. A quantile: ``histogram_quantile(0.99, ...)`` of the histogram's
    buckets, divided into seconds.
    """
    exact = {namespace_label: namespace} if namespace_label else {}
    pods = {"pod": runtimes.build_pod_regex(deployment)}

    def rate(metric: str, labels: Mapping[str, str]) -> str:
        return f"rate({metric}{build_matchers(exact, {**pods, **labels})}[{window}])"

    if isinstance(mapping, runtimes.ErrorRateMapping):
        def total(counters: tuple[runtimes.Counter, ...]) -> str:
            return " + ".join(f"(sum({rate(c.metric, c.labels)}) or vector(0))" for c in counters)
        return f"({total(mapping.errors)}) / ({total(mapping.total)})"
    quantile = (f"histogram_quantile({scrape.LATENCY_QUANTILE}, sum by (le) "
                f"({rate(mapping.histogram + '_bucket', mapping.labels)}))")
    scale = runtimes.UNIT_SECONDS[mapping.unit]
    return quantile if scale == 1.0 else f"{quantile} / {round(1 / scale)}"


def _counter_names(metric: str) -> tuple[str, str]:
    """The names a counter's samples may have once parsed: prometheus_client's text parser names the samples of a
    counter family ``<family>_total`` even where the runtime exposes them without the suffix (Triton's
    ``nv_inference_request_success``, TorchServe's ``Requests5XX``), which is the name Prometheus itself stores."""
    return metric, metric + "_total"


def _matches_regex(labels: tuple[tuple[str, str], ...], wanted: Mapping[str, str]) -> bool:
    have = dict(labels)
    return all(re.fullmatch(pattern, have.get(name, "")) is not None for name, pattern in wanted.items())


def build_mapped_value(mapping: runtimes.ErrorRateMapping | runtimes.QuantileMapping,
                       increase: Mapping[scrape.SeriesKey, float]) -> float | None:
    """A builtin of another runtime from the increases of its pods' series (scraped): errors / total, or the
    histogram's p99 in seconds; None: no requests (no total, no observations)."""
    if isinstance(mapping, runtimes.ErrorRateMapping):
        def total(counters: tuple[runtimes.Counter, ...]) -> float:
            return sum(value for (name, labels), value in increase.items() for c in counters
                       if name in _counter_names(c.metric) and _matches_regex(labels, c.labels))
        all_requests = total(mapping.total)
        return total(mapping.errors) / all_requests if all_requests > 0 else None
    bucket = mapping.histogram + "_bucket"
    chosen = {key: value for key, value in increase.items()
              if key[0] == bucket and _matches_regex(key[1], mapping.labels)}
    value = scrape.build_latency_quantile(chosen, metric=mapping.histogram)
    return None if value is None else value * runtimes.UNIT_SECONDS[mapping.unit]


def build_mapped_names(mapping: runtimes.ErrorRateMapping | runtimes.QuantileMapping) -> frozenset[str]:
    """The sample names a mapping reads."""
    if isinstance(mapping, runtimes.ErrorRateMapping):
        return frozenset(n for c in (*mapping.errors, *mapping.total) for n in _counter_names(c.metric))
    return frozenset({mapping.histogram + "_bucket"})


def build_address(analysis_spec: spec_mod.Analysis, env: base.Env) -> str | None:
    """The Prometheus builtins are read from; None: scraped from the pods."""
    return analysis_spec.prometheus_address or env.prometheus_address


class BuiltinBackend:
    key: ClassVar[str] = "builtin"
    planned: ClassVar[bool] = False

    def uses_pods(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis, env: base.Env) -> bool:
        return build_address(analysis_spec, env) is None

    def spec_address(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis,
                     index: int) -> tuple[str, str] | None:
        return prometheus.build_spec_address(metric, analysis_spec, index)

    def relative_floor(self, metric: spec_mod.Metric) -> float:
        return RELATIVE_FLOORS.get(str(metric.builtin), scrape.DEFAULT_RELATIVE_FLOOR)

    async def measure(self, request: base.MeasurementRequest, env: base.Env) -> analysis.Sample:
        metric = request.metric.builtin
        assert metric is not None
        address = build_address(request.analysis, env)
        if metric == PREDICTION_AGREEMENT:
            return await self._measure_agreement(request, env, address)
        if request.runtime is not None:
            return await self._measure_mapped(metric, request, env, address)
        if address is not None:
            window = build_query_window(request.analysis.interval_seconds, env.min_window_seconds)
            query = build_builtin_query(metric, request.namespace, request.model, request.version, window,
                                        namespace_label=env.namespace_label)
            value, error = await prometheus.query_prometheus(env, address, query)
            return analysis.Sample(value=value, query=query, error=error)
        return await self._scrape(metric, request, env)

    async def _measure_agreement(self, request: base.MeasurementRequest, env: base.Env,
                                 address: str | None) -> analysis.Sample:
        """predictionAgreement of the candidate (``request.version``), measured on the stable's pods, which copy the
        requests and count the outcomes labelled with the candidate; the Sample's figures carry the copies so far."""
        candidate = request.version
        if address is not None:
            window = build_query_window(request.analysis.interval_seconds, env.min_window_seconds)
            stable = request.stable_version
            query = build_agreement_query(request.namespace, request.model, candidate, window, stable=stable,
                                          namespace_label=env.namespace_label)
            counts = [build_shadow_count_query(request.namespace, request.model, candidate, outcome, stable=stable,
                                               namespace_label=env.namespace_label) for outcome in SHADOW_FIGURES]
            results = await asyncio.gather(*(prometheus.query_prometheus(env, address, q) for q in (query, *counts)))
            (value, error), *outcomes = results
            figures = {name: found or 0.0 for name, (found, failed) in zip(SHADOW_FIGURES.values(), outcomes,
                                                                           strict=True) if failed is None}
            return analysis.Sample(value=value, query=query, error=error, figures=figures or None)
        labels = {contract.LABEL_MODEL: request.model, contract.LABEL_CANDIDATE: candidate}
        if request.stable_version:
            labels[contract.LABEL_VERSION] = request.stable_version
        names = {contract.METRIC_SHADOW_REQUESTS, contract.METRIC_SHADOW_ROWS, contract.METRIC_SHADOW_AGREEING_ROWS}

        def wanted(sample: str, sample_labels: Mapping[str, str]) -> bool:
            return sample in names and all(sample_labels.get(k) == v for k, v in labels.items())

        on_stable = dataclasses.replace(request, targets=request.stable_targets)
        scraped = await scrape.query_snapshots(env, on_stable, wanted)
        what = (f"agreeing rows / rows of {contract.METRIC_SHADOW_ROWS}{prometheus.build_selector(labels)} on the "
                f"stable's pods (version {request.stable_version})")
        query = scrape.build_description(on_stable, what, scraped, windowed=True,
                                         first_note=" since shadowing began (first scrape)")
        if scraped is None:
            return analysis.Sample(value=None, query=query)
        increase = scrape.build_series_increase(scraped.before, scraped.current)
        return analysis.Sample(value=contract.build_prediction_agreement(increase, labels), query=query,
                               figures=build_shadow_figures(scraped.current, labels))

    async def _measure_mapped(self, metric: Builtin, request: base.MeasurementRequest, env: base.Env,
                              address: str | None) -> analysis.Sample:
        """A builtin of another runtime, by its metric mapping (admission refused builtins it lacks; one that
        lacks it anyway measures nothing: an Error naming the mapping)."""
        assert request.runtime is not None
        mapping = request.runtime.metrics.mapping(metric)
        if mapping is None:
            return analysis.Sample(value=None, query="", error=f"builtin {metric} is not mapped for this runtime "
                                                                "(spec.serving.runtime.metrics)")
        deployment = naming.build_deployment_name(request.name, request.version)
        if address is not None:
            window = build_query_window(request.analysis.interval_seconds, env.min_window_seconds)
            query = build_mapped_query(metric, mapping, request.namespace, deployment, window,
                                       namespace_label=env.namespace_label)
            value, error = await prometheus.query_prometheus(env, address, query)
            return analysis.Sample(value=value, query=query, error=error)
        names = build_mapped_names(mapping)
        what = (f"{metric} of {', '.join(sorted(names))} (the runtime's metrics at {request.metrics_path} of "
                f"{deployment}'s pods)")
        return await _scrape_increase(request, env, lambda sample, labels: sample in names, what,
                                      lambda increase: build_mapped_value(mapping, increase))

    async def _scrape(self, metric: Builtin, request: base.MeasurementRequest, env: base.Env) -> analysis.Sample:
        model, version = request.model, request.version
        names = {contract.METRIC_REQUESTS_TOTAL, contract.METRIC_REQUEST_DURATION + "_bucket"}

        def wanted(sample: str, labels: Mapping[str, str]) -> bool:
            return (sample in names and labels.get(contract.LABEL_MODEL) == model
                    and labels.get(contract.LABEL_VERSION) == version)

        labels = prometheus.build_selector({contract.LABEL_MODEL: model, contract.LABEL_VERSION: version})
        what = (f"5xx share of {contract.METRIC_REQUESTS_TOTAL}{labels}" if metric == "errorRate" else
                f"p99 of {contract.METRIC_REQUEST_DURATION}{labels}")
        compute = scrape.build_error_rate if metric == "errorRate" else scrape.build_latency_quantile
        return await _scrape_increase(request, env, wanted, what, compute)


async def _scrape_increase(request: base.MeasurementRequest, env: base.Env,
                           wanted: Callable[[str, Mapping[str, str]], bool], what: str,
                           compute: Callable[[Mapping[scrape.SeriesKey, float]], float | None]) -> analysis.Sample:
    """A windowed builtin scraped from the version's pods: ``compute`` over the increase of the ``wanted`` series
    since the previous snapshot (the pods' lifetime so far at the first); no snapshot is no data."""
    scraped = await scrape.query_snapshots(env, request, wanted)
    query = scrape.build_description(request, what, scraped, windowed=True,
                                     first_note=" since the pods started (first scrape)")
    if scraped is None:
        return analysis.Sample(value=None, query=query)
    increase = scrape.build_series_increase(scraped.before, scraped.current)
    return analysis.Sample(value=compute(increase), query=query)


BACKEND: Final = BuiltinBackend()
