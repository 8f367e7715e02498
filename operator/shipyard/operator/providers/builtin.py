"""The ``builtin`` metric provider: the runtime's own request metrics, errorRate and latencyP99. Does I/O (HTTP).

Spec fragment ``metrics[].builtin: errorRate | latencyP99``. Measured from Prometheus when an address applies
(``spec.rollout.analysis.prometheus.address``, else the operator's ``--prometheus-address``): ``rate`` over the
interval (at least a minute) of ``shipyard_requests_total`` / ``shipyard_request_duration_seconds`` of the version;
else by scraping the version's pods directly (a pod absent from the previous snapshot counts from zero, so the first
measurement of a version covers its pods' lifetime so far).

errorRate: the 5xx share (no 5xx series is 0, no requests at all is no data). latencyP99: the 99th percentile of
the request duration histogram (no requests: no data). In ``maxRelativeToStable`` comparisons the stable's value
is raised to a floor (``RELATIVE_FLOORS``), so that a near-zero stable does not fail a near-zero candidate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Final, Literal, TypeAlias

from shipyard import contract
from shipyard.operator import analysis
from shipyard.operator.providers import base, prometheus, scrape

if TYPE_CHECKING:
    from shipyard.operator import spec as spec_mod

Builtin: TypeAlias = Literal["errorRate", "latencyP99"]
BUILTINS: Final[tuple[Builtin, ...]] = ("errorRate", "latencyP99")
# errorRate 0.001 = one error in a thousand requests; latencyP99 0.005 s, the resolution of the latency histogram's
# low buckets.
RELATIVE_FLOORS: Final[Mapping[str, float]] = {"errorRate": 0.001, "latencyP99": 0.005}


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
        if address is not None:
            window = build_query_window(request.analysis.interval_seconds, env.min_window_seconds)
            query = build_builtin_query(metric, request.namespace, request.model, request.version, window,
                                        namespace_label=env.namespace_label)
            value, error = await prometheus.query_prometheus(env, address, query)
            return analysis.Sample(value=value, query=query, error=error)
        return await self._scrape(metric, request, env)

    async def _scrape(self, metric: Builtin, request: base.MeasurementRequest, env: base.Env) -> analysis.Sample:
        model, version = request.model, request.version
        names = {contract.METRIC_REQUESTS_TOTAL, contract.METRIC_REQUEST_DURATION + "_bucket"}

        def wanted(sample: str, labels: Mapping[str, str]) -> bool:
            return (sample in names and labels.get(contract.LABEL_MODEL) == model
                    and labels.get(contract.LABEL_VERSION) == version)

        scraped = await scrape.query_snapshots(env, request, wanted)
        labels = prometheus.build_selector({contract.LABEL_MODEL: model, contract.LABEL_VERSION: version})
        what = (f"5xx share of {contract.METRIC_REQUESTS_TOTAL}{labels}" if metric == "errorRate" else
                f"p99 of {contract.METRIC_REQUEST_DURATION}{labels}")
        query = scrape.build_description(request, what, scraped, windowed=True,
                                         first_note=" since the pods started (first scrape)")
        if scraped is None:
            return analysis.Sample(value=None, query=query)
        increase = scrape.build_series_increase(scraped.before, scraped.current)
        value = scrape.build_error_rate(increase) if metric == "errorRate" else scrape.build_latency_quantile(increase)
        return analysis.Sample(value=value, query=query)


BACKEND: Final = BuiltinBackend()
