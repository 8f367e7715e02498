"""Metric providers of the analysis: the Prometheus HTTP API and a direct scrape of the pods' ``/metrics``. Does I/O.

Every provider implements ``Provider.measure(request) -> analysis.Sample`` and never raises into the reconciler:
connection refused, timeouts, HTTP errors, malformed JSON or exposition text, non-numeric values and several
series where one is expected all become a ``Sample`` with ``error`` set (an Error measurement); no data (an
empty vector, NaN, no requests in the interval) is a Sample without value and without error. Only cancellation
propagates.

``Providers`` is the factory the handlers keep for the operator's lifetime: per metric it picks Prometheus (the
metric's address, else ``spec.rollout.analysis.prometheus.address``, else the operator's configured address) or,
for builtin metrics when no address is configured, the scrape provider; ``scrape`` metrics always scrape.

The scrape provider keeps, in memory, the previous snapshot of each (namespace, name, metric, version) to compute
increases over the interval. Builtins count a pod absent from the previous snapshot from zero, so the first
measurement of a version (and the first after an operator restart) covers the pods' lifetime so far; a ``scrape``
metric with ``rate: true`` has no data until its second measurement (and again after an operator restart).
Scrape targets are ``host:port`` of the version's pods, given by the caller (``egress.assess_scrape_pod`` chose
them); anything else (a URL, a path, a scheme) is refused.

Egress (``egress``): a Prometheus address from the spec is queried only when ``egress.assess_prometheus_address``
allows it (the operator's own address, its ``--allowed-prometheus-address`` entries, or the namespace's annotation
entries passed in by the caller); a refused address gets no request at all: each of its measurements is an Error
naming the field and the rule. Every error text is redacted (``egress.build_capped``: no userinfo, no
credential-looking query values, at most ``egress.MAX_ERROR_TEXT`` characters) before it reaches a Sample or a log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aiohttp
from prometheus_client import parser as prom_parser

from shipyard import contract
from shipyard.operator import analysis, egress
from shipyard.operator import spec as spec_mod

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS: Final = 5.0
MAX_RESPONSE_BYTES: Final = 8 * 1024 * 1024
STALE_SNAPSHOT_SECONDS: Final = 3 * 3600.0  # longer than the longest interval (1h)
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*"
)
_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}")


class ProviderError(Exception):
    """A measurement that failed; its message becomes the Sample's error."""


@dataclass(frozen=True)
class MeasurementRequest:
    """One metric to measure for one version of a model.

    ``query`` is the resolved PromQL (Prometheus providers); ``targets`` are the ``host:port`` of the version's
    ready pods and ``key`` identifies the series of measurements whose previous snapshot is kept (scrape).
    """

    namespace: str
    name: str  # the ModelDeployment's
    metric: spec_mod.Metric
    model: str  # value of the runtime's ``model`` label (the served model name)
    version: str  # the version measured (candidate or stable)
    query: str = ""
    targets: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, ...]:
        """Identifies the series of measurements (same metric definition, same version) for the scrape state."""
        return self.namespace, self.name, self.metric.name, repr(self.metric.provider), self.version

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.name} metric {self.metric.name} of version {self.version}"


class Provider(Protocol):
    async def measure(self, request: MeasurementRequest) -> analysis.Sample:
        """Measures the request's metric; never raises (errors are a Sample with ``error`` set)."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# HTTP


class _Http:
    """A lazily created aiohttp session with a total timeout per request and a bound on the response size."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_seconds))
        return self._session

    async def fetch(self, url: str, params: Mapping[str, str] | None = None, *,
                    allow_redirects: bool = True) -> tuple[int, bytes]:
        """Status and body of a GET; transport failures and timeouts raise ProviderError."""
        try:
            async with self.session().get(url, params=params, allow_redirects=allow_redirects) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise ProviderError(f"response of {egress.redact_url(url)} larger than {MAX_RESPONSE_BYTES} "
                                            "bytes")
                    chunks.append(chunk)
                return response.status, b"".join(chunks)
        except TimeoutError as exc:
            raise ProviderError(f"timed out after {self.timeout_seconds:g}s fetching {egress.redact_url(url)}") from exc
        except aiohttp.ClientError as exc:
            raise ProviderError(egress.build_capped(
                f"could not fetch {egress.redact_url(url)}: {exc or type(exc).__name__}")) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# ---------------------------------------------------------------------------------------------------------------
# Prometheus


def build_prometheus_value(payload: object) -> tuple[float | None, str | None]:
    """(value, error) from a decoded ``/api/v1/query`` response: a scalar or a one-element vector has a value;
    an empty vector or NaN is no data (None, None); anything else is an error."""
    if not isinstance(payload, Mapping):
        return None, "malformed response: not a JSON object"
    if payload.get("status") != "success":
        kind = payload.get("errorType") or "error"
        return None, f"Prometheus answered {kind}: {payload.get('error') or payload.get('status')}"
    data = payload.get("data")
    if not isinstance(data, Mapping):
        return None, "malformed response: no data"
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return _parse_point(result)
    if kind == "vector":
        if not isinstance(result, list):
            return None, "malformed response: vector result is not a list"
        if not result:
            return None, None
        if len(result) > 1:
            series = ", ".join(_series_labels(s) for s in result[:3]) + (", ..." if len(result) > 3 else "")
            return None, f"query returned {len(result)} series, expected one: {series}"
        item = result[0]
        if not isinstance(item, Mapping):
            return None, "malformed response: vector element is not an object"
        return _parse_point(item.get("value"))
    return None, f"query returned a {kind}, expected a scalar or a one-element vector"


def _series_labels(series: object) -> str:
    labels = series.get("metric") if isinstance(series, Mapping) else None
    if not isinstance(labels, Mapping):
        return "{}"
    return "{" + ",".join(f"{k}={v!r}" for k, v in sorted(labels.items())) + "}"


def _parse_point(point: object) -> tuple[float | None, str | None]:
    if not isinstance(point, list) or len(point) != 2:
        return None, f"malformed response: sample {point!r:.100} is not [time, value]"
    raw = point[1]
    if not isinstance(raw, str):
        return None, f"malformed response: value {raw!r:.100} is not a string"
    try:
        value = float(raw)
    except ValueError:
        return None, f"value {raw!r:.100} is not a number"
    return (None, None) if math.isnan(value) else (value, None)


class PrometheusProvider:
    """Instant queries against one Prometheus HTTP API (``GET {address}/api/v1/query``)."""

    def __init__(self, address: str, *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
                 http: _Http | None = None) -> None:
        self.address = address.rstrip("/")
        self.shown = egress.redact_url(self.address)
        self._http = http or _Http(timeout_seconds)
        self._owns_http = http is None

    async def measure(self, request: MeasurementRequest) -> analysis.Sample:
        try:
            value, error = await self.query_prometheus(request.query)
        except ProviderError as exc:
            value, error = None, str(exc)
        except Exception as exc:  # a bug here must not reach the reconciler either
            logger.error("Failed to query Prometheus at %s: internal error %s: %s", self.shown, type(exc).__name__,
                         egress.build_capped(str(exc)))
            value, error = None, f"internal error: {type(exc).__name__}: {exc}"
        if error is not None:
            error = egress.build_capped(error)
            logger.warning("Failed to measure %s: %s", request.where, error)
        return analysis.Sample(value=value, query=request.query, error=error)

    async def query_prometheus(self, query: str) -> tuple[float | None, str | None]:
        """(value, error) of an instant query; transport failures raise ProviderError."""
        status, body = await self._http.fetch(f"{self.address}/api/v1/query", {"query": query})
        try:
            payload: Any = json.loads(body)
        except ValueError:
            payload = None
        if status != 200:
            if isinstance(payload, Mapping) and payload.get("status") == "error":
                return None, f"HTTP {status}: {build_prometheus_value(payload)[1]}"
            return None, f"HTTP {status} from {self.shown}: {body[:200].decode('utf-8', 'replace')}"
        if payload is None:
            return None, f"malformed response from {self.shown}: not JSON: {body[:100].decode('utf-8', 'replace')}"
        return build_prometheus_value(payload)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.close()


# ---------------------------------------------------------------------------------------------------------------
# Direct scrape


def build_scrape_url(target: str) -> str:
    """``http://host:port/metrics`` for a ``host:port`` target (IPv4, [IPv6] or a hostname); else ValueError."""
    host, sep, port = target.rpartition(":")
    if not sep or not _PORT_RE.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"scrape target {target!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"scrape target {target!r} has an invalid IPv6 address") from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"scrape target {target!r} is not an IP address or a hostname with a port")
    elif host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"scrape target {target!r} has an invalid IPv4 address") from None
    return f"http://{host}:{port}{contract.PATH_METRICS}"


def build_target_snapshot(text: str, wanted: Callable[[str, Mapping[str, str]], bool]) -> dict[
        analysis.SeriesKey, analysis.SeriesSample]:
    """The samples of a ``/metrics`` text for which ``wanted(name, labels)`` holds, with their series' ``_created``.

    Malformed text raises ValueError (from prometheus_client's parser).
    """
    values: dict[analysis.SeriesKey, float] = {}
    created: dict[analysis.SeriesKey, float] = {}
    for family in prom_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {str(k): str(v) for k, v in sample.labels.items()}
            if sample.name.endswith("_created"):
                created[analysis.build_series_key(sample.name, labels)] = float(sample.value)
            if wanted(sample.name, labels):
                values[analysis.build_series_key(sample.name, labels)] = float(sample.value)
    out: dict[analysis.SeriesKey, analysis.SeriesSample] = {}
    for key, value in values.items():
        name, series_labels = key
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        created_key = (base + "_created", tuple(kv for kv in series_labels if kv[0] != "le"))
        out[key] = analysis.SeriesSample(value=value, created=created.get(created_key))
    return out


@dataclass
class _Previous:
    at: float
    snapshot: dict[str, dict[analysis.SeriesKey, analysis.SeriesSample]] = field(default_factory=dict)


class ScrapeProvider:
    """Scrapes the ``/metrics`` of a version's pods and computes builtins or ``scrape`` metrics over the interval."""

    def __init__(self, *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, http: _Http | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._http = http or _Http(timeout_seconds)
        self._owns_http = http is None
        self._clock = clock
        self._previous: dict[tuple[str, ...], _Previous] = {}

    async def measure(self, request: MeasurementRequest) -> analysis.Sample:
        try:
            return await self._measure(request)
        except ProviderError as exc:
            error = str(exc)
        except ValueError as exc:  # an invalid target
            error = str(exc)
        except Exception as exc:  # a bug here must not reach the reconciler either
            logger.error("Failed to scrape for %s: internal error %s: %s", request.where, type(exc).__name__,
                         egress.build_capped(str(exc)))
            error = f"internal error: {type(exc).__name__}: {exc}"
        error = egress.build_capped(error)
        logger.warning("Failed to measure %s: %s", request.where, error)
        return analysis.Sample(value=None, query=self._describe(request, None, first=False), error=error)

    async def _measure(self, request: MeasurementRequest) -> analysis.Sample:
        urls = [build_scrape_url(t) for t in request.targets]
        if not urls:
            return analysis.Sample(value=None, query=self._describe(request, None, first=False) + ": no ready pods")
        wanted = self._selector(request)
        texts = await asyncio.gather(*(self.fetch_metrics(u) for u in urls), return_exceptions=True)
        current: dict[str, dict[analysis.SeriesKey, analysis.SeriesSample]] = {}
        for target, url, text in zip(request.targets, urls, texts, strict=True):
            if isinstance(text, BaseException):
                raise text
            try:
                current[target] = build_target_snapshot(text, wanted)
            except (ValueError, TypeError, IndexError) as exc:
                raise ProviderError(f"malformed metrics text from {url}: {exc}") from exc
        now = self._clock()
        self._forget_stale(now)
        previous = self._previous.get(request.key)
        elapsed = None if previous is None else now - previous.at
        self._previous[request.key] = _Previous(at=now, snapshot=current)
        before = None if previous is None else previous.snapshot
        provider = request.metric.provider
        value: float | None
        if isinstance(provider, spec_mod.ScrapeProvider):
            value = analysis.build_scrape_value(provider, before, current, elapsed)
        elif isinstance(provider, spec_mod.BuiltinProvider) and provider.metric == "errorRate":
            value = analysis.build_error_rate(analysis.build_series_increase(before, current))
        elif isinstance(provider, spec_mod.BuiltinProvider):
            value = analysis.build_latency_quantile(analysis.build_series_increase(before, current))
        else:
            raise ProviderError(f"metric {request.metric.name} is not measurable by scraping the pods")
        return analysis.Sample(value=value, query=self._describe(request, elapsed, first=previous is None))

    @staticmethod
    def _selector(request: MeasurementRequest) -> Callable[[str, Mapping[str, str]], bool]:
        provider = request.metric.provider
        if isinstance(provider, spec_mod.ScrapeProvider):
            name = provider.metric
            return lambda sample, labels: sample == name
        model, version = request.model, request.version
        names = {contract.METRIC_REQUESTS_TOTAL, contract.METRIC_REQUEST_DURATION + "_bucket"}

        def wanted(sample: str, labels: Mapping[str, str]) -> bool:
            return (sample in names and labels.get(contract.LABEL_MODEL) == model
                    and labels.get(contract.LABEL_VERSION) == version)

        return wanted

    @staticmethod
    def _describe(request: MeasurementRequest, elapsed: float | None, *, first: bool) -> str:
        provider = request.metric.provider
        labels = analysis.build_selector({contract.LABEL_MODEL: request.model, contract.LABEL_VERSION: request.version})
        windowed = True
        if isinstance(provider, spec_mod.ScrapeProvider):
            windowed = provider.rate
            what = f"{provider.aggregation} of {'rate of ' if provider.rate else ''}{provider.metric}"
            if provider.labels:
                what += analysis.build_selector(provider.labels)
        elif isinstance(provider, spec_mod.BuiltinProvider) and provider.metric == "errorRate":
            what = f"5xx share of {contract.METRIC_REQUESTS_TOTAL}{labels}"
        else:
            what = f"p99 of {contract.METRIC_REQUEST_DURATION}{labels}"
        if windowed and elapsed is not None:
            what += f" over the last {elapsed:.0f}s"
        elif windowed and first:
            what += " (first scrape: no rate yet)" if not isinstance(provider, spec_mod.BuiltinProvider) else (
                " since the pods started (first scrape)")
        return f"scrape of {len(request.targets)} pod(s): {what}"

    async def fetch_metrics(self, url: str) -> str:
        """The exposition text at ``url``; anything but HTTP 200 raises ProviderError."""
        status, body = await self._http.fetch(url, allow_redirects=False)
        if status != 200:
            raise ProviderError(f"HTTP {status} from {url}")
        return body.decode("utf-8", "replace")

    def _forget_stale(self, now: float) -> None:
        for key in [k for k, p in self._previous.items() if now - p.at > STALE_SNAPSHOT_SECONDS]:
            del self._previous[key]

    async def close(self) -> None:
        if self._owns_http:
            await self._http.close()


class _RefusedProvider:
    """A spec-supplied Prometheus address that egress refused: no request, every measurement an Error saying why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def measure(self, request: MeasurementRequest) -> analysis.Sample:
        return analysis.Sample(value=None, query=request.query, error=f"refused: {self.reason}")


class _UnconfiguredProvider:
    """A prometheus metric without any Prometheus address: every measurement is an Error saying so."""

    async def measure(self, request: MeasurementRequest) -> analysis.Sample:
        return analysis.Sample(
            value=None,
            query=request.query,
            error=("no Prometheus address: set spec.rollout.analysis.prometheus.address, the metric's "
                   "prometheus.address or the operator's Prometheus address"),
        )


# ---------------------------------------------------------------------------------------------------------------
# The factory


class Providers:
    """The providers of one operator process: one HTTP session, Prometheus providers by address, one scraper.

    ``prometheus_address`` is the operator's configured Prometheus (None: builtins are scraped from the pods);
    ``allowed_addresses`` the further Prometheus addresses a spec may name (``--allowed-prometheus-address``);
    invalid entries raise ValueError (a configuration error: the operator must not start with it);
    ``namespace_label`` is the label Prometheus puts the pod's namespace in (None: not matched in builtin
    queries); builtin queries use ``rate`` over the interval, at least ``min_window_seconds``.
    """

    def __init__(self, prometheus_address: str | None = None, *, allowed_addresses: Sequence[str] = (),
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, namespace_label: str | None = "namespace",
                 min_window_seconds: float = analysis.DEFAULT_MIN_WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.prometheus_address = prometheus_address
        own, problems = egress.parse_address_list(prometheus_address, egress.FLAG_OPERATOR, userinfo=True)
        more, more_problems = egress.parse_address_list(allowed_addresses, egress.FLAG_ALLOWED)
        if problems or more_problems:
            raise ValueError("; ".join(problems + more_problems))
        self.allowed: tuple[egress.Allowed, ...] = own + more
        self.namespace_label = namespace_label
        self.min_window_seconds = min_window_seconds
        self._http = _Http(timeout_seconds)
        self._prometheus: dict[str, PrometheusProvider] = {}
        self.scrape = ScrapeProvider(http=self._http, clock=clock)
        self._unconfigured = _UnconfiguredProvider()

    def build_address(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis) -> str | None:
        """The Prometheus address of a builtin or prometheus metric (None: none configured); None for scrape."""
        if isinstance(metric.provider, spec_mod.ScrapeProvider):
            return None
        return analysis_spec.address_for(metric) or self.prometheus_address

    @staticmethod
    def build_spec_address(metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis) -> tuple[str, str] | None:
        """(field path, address) of the spec-supplied Prometheus address ``metric`` uses; None: none from the spec."""
        if isinstance(metric.provider, spec_mod.ScrapeProvider):
            return None
        if isinstance(metric.provider, spec_mod.PrometheusProvider) and metric.provider.address is not None:
            index = analysis_spec.metrics.index(metric)
            return f"spec.rollout.analysis.metrics[{index}].prometheus.address", metric.provider.address
        if analysis_spec.prometheus_address is not None:
            return "spec.rollout.analysis.prometheus.address", analysis_spec.prometheus_address
        return None

    def assess_address(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis,
                       namespace_allowed: Sequence[egress.Allowed] = ()) -> egress.Decision | None:
        """The egress decision on the metric's spec-supplied address; None when it uses none."""
        supplied = self.build_spec_address(metric, analysis_spec)
        if supplied is None:
            return None
        field, address = supplied
        return egress.assess_prometheus_address(address, field, self.allowed + tuple(namespace_allowed))

    def needs_namespace_allow_list(self, analysis_spec: spec_mod.Analysis) -> bool:
        """Whether some spec-supplied address is not settled by the operator's own configuration alone (the caller
        then reads the namespace's annotation; otherwise it need not)."""
        for metric in analysis_spec.metrics:
            supplied = self.build_spec_address(metric, analysis_spec)
            if supplied is None or egress.has_userinfo(supplied[1]):
                continue
            decision = self.assess_address(metric, analysis_spec)
            if decision is not None and not decision.allowed:
                return True
        return False

    def select(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis,
               namespace_allowed: Sequence[egress.Allowed] = ()) -> Provider:
        """The provider measuring ``metric``: Prometheus when an address applies (a refused spec-supplied address:
        one that answers every measurement with the refusal), else the scraper (builtins)."""
        decision = self.assess_address(metric, analysis_spec, namespace_allowed)
        if decision is not None and not decision.allowed:
            return _RefusedProvider(decision.reason)
        address = self.build_address(metric, analysis_spec)
        if address is not None:
            provider = self._prometheus.get(address)
            if provider is None:
                provider = self._prometheus[address] = PrometheusProvider(address, http=self._http)
            return provider
        if isinstance(metric.provider, spec_mod.PrometheusProvider):
            return self._unconfigured
        return self.scrape

    def build_request(
        self,
        metric: spec_mod.Metric,
        analysis_spec: spec_mod.Analysis,
        *,
        namespace: str,
        name: str,
        model: str,
        version: str,
        stable_version: str | None,
        targets: Sequence[str] = (),
    ) -> MeasurementRequest:
        """The request measuring ``metric`` for ``version`` (the candidate's, or the stable's for comparisons).

        ``name`` is the ModelDeployment's, ``model`` the runtime's ``model`` label (the served model name).
        """
        query = ""
        provider = metric.provider
        if isinstance(provider, spec_mod.PrometheusProvider):
            query = analysis.render_query(provider.query, namespace, name, version, stable_version)
        elif isinstance(provider, spec_mod.BuiltinProvider) and self.build_address(metric, analysis_spec):
            window = analysis.build_query_window(analysis_spec.interval_seconds, self.min_window_seconds)
            query = analysis.build_builtin_query(provider.metric, namespace, model, version, window,
                                                 namespace_label=self.namespace_label)
        return MeasurementRequest(namespace=namespace, name=name, metric=metric, model=model, version=version,
                                  query=query, targets=tuple(targets))

    async def query_measurements(
        self,
        analysis_spec: spec_mod.Analysis,
        *,
        namespace: str,
        name: str,
        model: str,
        candidate_version: str,
        stable_version: str | None,
        candidate_targets: Sequence[str] = (),
        stable_targets: Sequence[str] = (),
        metric_names: Sequence[str] | None = None,
        namespace_allowed: Sequence[egress.Allowed] = (),
    ) -> dict[str, analysis.Measurement]:
        """Measures every metric (or those in ``metric_names``) concurrently, by metric name; never raises.

        The stable version is measured too for metrics with ``maxRelativeToStable`` when there is one.
        ``namespace_allowed`` are the entries of the namespace's allow-list annotation (``egress``).
        """
        metrics = [m for m in analysis_spec.metrics if metric_names is None or m.name in metric_names]

        async def one(metric: spec_mod.Metric) -> analysis.Measurement:
            def request(version: str, targets: Sequence[str]) -> MeasurementRequest:
                return self.build_request(metric, analysis_spec, namespace=namespace, name=name, model=model,
                                          version=version, stable_version=stable_version, targets=targets)

            try:
                provider = self.select(metric, analysis_spec, namespace_allowed)
                if metric.compares_with_stable and stable_version is not None:
                    candidate, stable = await asyncio.gather(
                        provider.measure(request(candidate_version, candidate_targets)),
                        provider.measure(request(stable_version, stable_targets)),
                    )
                    return analysis.Measurement(candidate=candidate, stable=stable)
                return analysis.Measurement(
                    candidate=await provider.measure(request(candidate_version, candidate_targets)))
            except Exception as exc:  # providers do not raise; this guards the request building around them
                error = egress.build_capped(f"internal error: {type(exc).__name__}: {exc}")
                logger.error("Failed to measure %s/%s metric %s: %s", namespace, name, metric.name, error)
                return analysis.Measurement(candidate=analysis.Sample(value=None, query="", error=error))

        results = await asyncio.gather(*(one(m) for m in metrics))
        for metric, measurement in zip(metrics, results, strict=True):
            logger.debug("Measured %s/%s metric %s: %s", namespace, name, metric.name, measurement)
        return {m.name: r for m, r in zip(metrics, results, strict=True)}

    async def close(self) -> None:
        await self._http.close()
