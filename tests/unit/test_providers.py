"""Metric providers against real HTTP servers on 127.0.0.1: a fake Prometheus API and pods serving /metrics.

Nothing here mocks the HTTP client: every case goes through aiohttp to a local server (or a closed port), and
the assertion is the Sample a provider returns, never an exception.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from shipyard import contract
from shipyard.operator import analysis, egress, providers
from shipyard.operator import spec as spec_mod
from shipyard.runtime import metrics as runtime_metrics

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Server:
    host: str
    port: int
    runner: web.AppRunner
    seen: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


async def start(routes: Mapping[str, Handler]) -> Server:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return Server("127.0.0.1", port, runner)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(provider: spec_mod.MetricProvider, name: str = "m", **thresholds: float) -> spec_mod.Metric:
    if not thresholds:
        thresholds = {"max": 1.0}
    return spec_mod.Metric(
        name=name,
        provider=provider,
        max=thresholds.get("max"),
        min=thresholds.get("min"),
        max_relative_to_stable=thresholds.get("rel"),
    )


# ---------------------------------------------------------------------------------------------------------------
# A fake Prometheus HTTP API


def vector(*values: str) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"pod": f"p{i}"}, "value": [1700000000.0, v]} for i, v in enumerate(values)]}}


PROMETHEUS_ANSWERS: dict[str, tuple[int, str]] = {
    "vector": (200, json.dumps(vector("0.25"))),
    "scalar": (200, json.dumps({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3.5"]}})),
    "empty": (200, json.dumps(vector())),
    "nan": (200, json.dumps(vector("NaN"))),
    "inf": (200, json.dumps(vector("+Inf"))),
    "two-series": (200, json.dumps(vector("1", "2"))),
    "matrix": (200, json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}})),
    "string": (200, json.dumps({"status": "success", "data": {"resultType": "string", "result": [1.0, "x"]}})),
    "not-a-number": (200, json.dumps(vector("abc"))),
    "number-not-string": (200, json.dumps({"status": "success", "data": {"resultType": "scalar",
                                                                           "result": [1.0, 0.5]}})),
    "short-point": (200, json.dumps({"status": "success", "data": {"resultType": "scalar", "result": [1.0]}})),
    "bad-query": (400, json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error at char 3"})),
    "unavailable": (503, "Service Unavailable"),
    "garbage": (200, "<html>not json{"),
    "json-list": (200, "[1, 2]"),
    "no-data-field": (200, json.dumps({"status": "success"})),
    "error-200": (200, json.dumps({"status": "error", "errorType": "timeout", "error": "query timed out"})),
}


@pytest.fixture
async def prometheus() -> AsyncIterator[Server]:
    server: Server

    async def query(request: web.Request) -> web.StreamResponse:
        q = request.query.get("query", "")
        server.seen.append(q)
        if q == "slow":
            await asyncio.sleep(1.0)
        if q.startswith("echo:"):  # the value is the query's length, to tell candidate and stable apart
            return web.json_response(vector(str(float(len(q)))))
        status, body = PROMETHEUS_ANSWERS.get(q, PROMETHEUS_ANSWERS["vector"])
        return web.Response(status=status, text=body, content_type="application/json")

    server = await start({"/api/v1/query": query, "/prefix/api/v1/query": query})
    yield server
    await server.runner.cleanup()


def request(query: str, provider: spec_mod.MetricProvider | None = None, targets: tuple[str, ...] = (),
            version: str = "1.1") -> providers.MeasurementRequest:
    return providers.MeasurementRequest(
        namespace="ml", name="digits", metric=metric(provider or spec_mod.PrometheusProvider(query=query)),
        model="digits", version=version, query=query, targets=targets)


@pytest.mark.parametrize(
    ("query", "value", "error"),
    [
        pytest.param("vector", 0.25, None, id="one-element-vector"),
        pytest.param("scalar", 3.5, None, id="scalar"),
        pytest.param("empty", None, None, id="empty-vector-no-data"),
        pytest.param("nan", None, None, id="nan-no-data"),
        pytest.param("inf", math.inf, None, id="inf-is-a-value"),
        pytest.param("two-series", None, "query returned 2 series, expected one", id="several-series"),
        pytest.param("matrix", None, "returned a matrix", id="matrix"),
        pytest.param("string", None, "returned a string", id="string"),
        pytest.param("not-a-number", None, "is not a number", id="non-numeric"),
        pytest.param("number-not-string", None, "is not a string", id="number-not-string"),
        pytest.param("short-point", None, "is not [time, value]", id="short-point"),
        pytest.param("bad-query", None, "HTTP 400: Prometheus answered bad_data: parse error", id="http-400"),
        pytest.param("unavailable", None, "HTTP 503", id="http-503"),
        pytest.param("garbage", None, "not JSON", id="garbage-json"),
        pytest.param("json-list", None, "not a JSON object", id="json-not-object"),
        pytest.param("no-data-field", None, "no data", id="no-data-field"),
        pytest.param("error-200", None, "Prometheus answered timeout", id="error-status-with-200"),
    ],
)
async def test_prometheus_answers(prometheus: Server, query: str, value: float | None, error: str | None) -> None:
    provider = providers.PrometheusProvider(prometheus.address)
    try:
        sample = await provider.measure(request(query))
    finally:
        await provider.close()
    assert prometheus.seen == [query]
    assert sample.query == query
    assert sample.value == value
    if error is None:
        assert sample.error is None
    else:
        assert sample.error is not None and error in sample.error


async def test_prometheus_timeout(prometheus: Server) -> None:
    provider = providers.PrometheusProvider(prometheus.address, timeout_seconds=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        sample = await provider.measure(request("slow"))
    finally:
        await provider.close()
    assert loop.time() - started < 0.9
    assert sample.value is None and sample.error is not None and "timed out after 0.2s" in sample.error


async def test_prometheus_connection_refused() -> None:
    provider = providers.PrometheusProvider(f"http://127.0.0.1:{closed_port()}")
    try:
        sample = await provider.measure(request("vector"))
    finally:
        await provider.close()
    assert sample.value is None and sample.error is not None and "could not fetch" in sample.error


async def test_prometheus_address_with_path_prefix(prometheus: Server) -> None:
    provider = providers.PrometheusProvider(prometheus.address + "/prefix/")
    try:
        sample = await provider.measure(request('sum(rate(x{version="1.1"}[1m]))'))
    finally:
        await provider.close()
    assert sample.value == 0.25 and sample.error is None
    assert prometheus.seen == ['sum(rate(x{version="1.1"}[1m]))']  # sent verbatim, URL-encoded on the way


async def test_prometheus_wrong_path_is_an_error(prometheus: Server) -> None:
    provider = providers.PrometheusProvider(prometheus.address + "/nowhere")
    try:
        sample = await provider.measure(request("vector"))
    finally:
        await provider.close()
    assert sample.error is not None and "HTTP 404" in sample.error


async def test_oversized_response_is_an_error(prometheus: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "MAX_RESPONSE_BYTES", 10)
    provider = providers.PrometheusProvider(prometheus.address)
    try:
        sample = await provider.measure(request("vector"))
    finally:
        await provider.close()
    assert sample.error is not None and "larger than 10 bytes" in sample.error


# ---------------------------------------------------------------------------------------------------------------
# Pods serving /metrics (the runtime's own metrics module renders the text)


@dataclass
class Pod:
    server: Server
    metrics: runtime_metrics.ServerMetrics
    status: int = 200
    body: str | None = None  # overrides the exposition

    def restart(self) -> None:
        self.metrics = runtime_metrics.ServerMetrics("digits", self.metrics.version)

    def serve(self, *, ok: int = 0, errors: int = 0, latency: float = 0.01) -> None:
        for _ in range(ok):
            self.metrics.observe_request(200, latency)
        for _ in range(errors):
            self.metrics.observe_request(503, latency)


@pytest.fixture
async def pods() -> AsyncIterator[list[Pod]]:
    out: list[Pod] = []

    def handler_for(index: int) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            pod = out[index]
            if pod.body is not None:
                return web.Response(status=pod.status, text=pod.body)
            return web.Response(status=pod.status, body=pod.metrics.build_exposition(),
                                content_type="text/plain")
        return handler

    for i in range(2):
        server = await start({"/metrics": handler_for(i)})
        out.append(Pod(server, runtime_metrics.ServerMetrics("digits", "1.1")))
    yield out
    for pod in out:
        await pod.server.runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ERROR_RATE = spec_mod.BuiltinProvider(metric="errorRate")
LATENCY = spec_mod.BuiltinProvider(metric="latencyP99")


async def scrape(provider: providers.ScrapeProvider, pods: list[Pod], what: spec_mod.MetricProvider,
                 version: str = "1.1") -> analysis.Sample:
    return await provider.measure(request("", what, tuple(p.server.target for p in pods), version))


async def test_scrape_error_rate_over_intervals_with_a_restart(pods: list[Pod]) -> None:
    clock = Clock()
    provider = providers.ScrapeProvider(clock=clock)
    try:
        a, b = pods
        a.serve(ok=90, errors=10)
        b.serve(ok=100)
        first = await scrape(provider, pods, ERROR_RATE)
        assert first.error is None and first.value == pytest.approx(10 / 200)
        assert "since the pods started" in first.query and "scrape of 2 pod(s)" in first.query

        a.serve(ok=10)
        b.serve(ok=5, errors=5)
        clock.now += 15
        second = await scrape(provider, pods, ERROR_RATE)
        assert second.value == pytest.approx(5 / 20)
        assert "over the last 15s" in second.query

        b.restart()  # counters back to zero: the reset is detected per series, not summed away
        b.serve(ok=3, errors=1)
        a.serve(ok=6)
        clock.now += 15
        third = await scrape(provider, pods, ERROR_RATE)
        assert third.value == pytest.approx(1 / 10)

        clock.now += 15
        idle = await scrape(provider, pods, ERROR_RATE)
        assert idle.value is None and idle.error is None  # no requests in the interval: no data
    finally:
        await provider.close()


async def test_scrape_latency_p99(pods: list[Pod]) -> None:
    clock = Clock()
    provider = providers.ScrapeProvider(clock=clock)
    try:
        a, b = pods
        a.serve(ok=50, latency=0.003)  # bucket (0.0025, 0.005]
        b.serve(ok=50, latency=0.003)
        first = await scrape(provider, pods, LATENCY)
        assert first.value == pytest.approx(0.0025 + 0.0025 * 99 / 100)

        a.serve(ok=98, latency=0.003)
        b.serve(ok=2, latency=0.4)  # bucket (0.25, 0.5]: ranks 99-100 of 100
        clock.now += 15
        second = await scrape(provider, pods, LATENCY)
        assert second.value == pytest.approx(0.25 + 0.25 * 1 / 2)
    finally:
        await provider.close()


async def test_scrape_filters_model_and_version(pods: list[Pod]) -> None:
    provider = providers.ScrapeProvider()
    try:
        pods[0].serve(ok=5, errors=5)
        sample = await scrape(provider, pods, ERROR_RATE, version="9.9")  # pods export version 1.1
        assert sample.value is None and sample.error is None
    finally:
        await provider.close()


async def test_scrape_user_metrics(pods: list[Pod]) -> None:
    clock = Clock()
    provider = providers.ScrapeProvider(clock=clock)
    inflight = spec_mod.ScrapeProvider(metric=contract.METRIC_INFLIGHT, aggregation="max")
    rate = spec_mod.ScrapeProvider(metric=contract.METRIC_REQUESTS_TOTAL, labels={"code": "200"}, rate=True)
    try:
        a, b = pods
        a.metrics.inflight.set(3)
        b.metrics.inflight.set(7)
        assert (await scrape(provider, pods, inflight)).value == 7.0
        a.serve(ok=10)
        b.serve(ok=1)
        first = await scrape(provider, pods, rate)
        assert first.value is None and first.error is None and "first scrape" in first.query
        a.serve(ok=20)
        b.serve(ok=10, errors=50)
        clock.now += 10
        assert (await scrape(provider, pods, rate)).value == pytest.approx(3.0)
    finally:
        await provider.close()


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        pytest.param(500, None, "HTTP 500", id="http-500"),
        pytest.param(200, "this is { not metrics", "malformed metrics text", id="garbage"),
        pytest.param(200, 'x{a="1"} not-a-number\n', "malformed metrics text", id="bad-value"),
    ],
)
async def test_scrape_bad_pod_is_an_error_and_keeps_the_snapshot(
    pods: list[Pod], status: int, body: str | None, error: str
) -> None:
    clock = Clock()
    provider = providers.ScrapeProvider(clock=clock)
    try:
        a, b = pods
        a.serve(ok=10)
        b.serve(ok=10)
        assert (await scrape(provider, pods, ERROR_RATE)).value == 0.0
        b.status, b.body = status, body
        a.serve(errors=10)
        clock.now += 15
        broken = await scrape(provider, pods, ERROR_RATE)
        assert broken.value is None and broken.error is not None and error in broken.error
        b.status, b.body = 200, None
        b.serve(ok=10)
        clock.now += 15
        recovered = await scrape(provider, pods, ERROR_RATE)
        assert recovered.value == pytest.approx(10 / 20)  # measured against the last good snapshot
        assert "over the last 30s" in recovered.query
    finally:
        await provider.close()


async def test_scrape_pod_down_and_no_pods(pods: list[Pod]) -> None:
    provider = providers.ScrapeProvider(timeout_seconds=1.0)
    try:
        down = await provider.measure(request("", ERROR_RATE, (pods[0].server.target, f"127.0.0.1:{closed_port()}")))
        assert down.value is None and down.error is not None and "could not fetch" in down.error
        none = await provider.measure(request("", ERROR_RATE, ()))
        assert none.value is None and none.error is None and "no ready pods" in none.query
    finally:
        await provider.close()


async def test_scrape_does_not_follow_redirects(pods: list[Pod]) -> None:
    """A pod cannot send the operator elsewhere: a redirect is an error, not followed."""
    elsewhere = pods[1].server.address + contract.PATH_METRICS

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(elsewhere)

    server = await start({"/metrics": redirect})
    provider = providers.ScrapeProvider()
    try:
        pods[1].serve(ok=10)
        sample = await provider.measure(request("", ERROR_RATE, (server.target,)))
    finally:
        await provider.close()
        await server.runner.cleanup()
    assert sample.value is None and sample.error is not None and "HTTP 302" in sample.error


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("http://10.0.0.1:8080", id="scheme"),
        pytest.param("10.0.0.1:8080/metrics", id="path"),
        pytest.param("10.0.0.1", id="no-port"),
        pytest.param("10.0.0.1:0", id="port-0"),
        pytest.param("10.0.0.1:65536", id="port-too-big"),
        pytest.param("10.0.0.1:+80", id="signed-port"),
        pytest.param("999.0.0.1:80", id="bad-ipv4"),
        pytest.param("1.2.3.4.5:80", id="five-octets"),
        pytest.param("user@host:80", id="userinfo"),
        pytest.param("a b:80", id="space"),
        pytest.param("[::1:80", id="open-bracket"),
        pytest.param("[zz::1]:80", id="bad-ipv6"),
        pytest.param("host:80?x=1", id="query"),
        pytest.param(":80", id="no-host"),
        pytest.param("-host:80", id="leading-hyphen"),
    ],
)
async def test_scrape_refuses_non_host_port_targets(target: str) -> None:
    with pytest.raises(ValueError):
        providers.build_scrape_url(target)
    provider = providers.ScrapeProvider()
    try:
        sample = await provider.measure(request("", ERROR_RATE, (target,)))
    finally:
        await provider.close()
    assert sample.value is None and sample.error is not None and "scrape target" in sample.error


@pytest.mark.parametrize(
    ("target", "url"),
    [
        pytest.param("10.1.2.3:8080", "http://10.1.2.3:8080/metrics", id="ipv4"),
        pytest.param("[fd00::1]:8080", "http://[fd00::1]:8080/metrics", id="ipv6"),
        pytest.param("digits-1-1.ml.svc:8080", "http://digits-1-1.ml.svc:8080/metrics", id="hostname"),
        pytest.param("localhost:65535", "http://localhost:65535/metrics", id="max-port"),
    ],
)
def test_scrape_url(target: str, url: str) -> None:
    assert providers.build_scrape_url(target) == url


# ---------------------------------------------------------------------------------------------------------------
# The factory


def analysis_spec(*metrics: spec_mod.Metric, address: str | None = None) -> spec_mod.Analysis:
    return spec_mod.Analysis(metrics=metrics, interval_seconds=15.0, prometheus_address=address)


@pytest.mark.parametrize(
    ("provider", "analysis_address", "operator_address", "chosen"),
    [  # spec addresses here are on the operator's allow-list (http://spec:9090, http://metric:9090)
        pytest.param(ERROR_RATE, None, None, "scrape", id="builtin-without-prometheus-scrapes"),
        pytest.param(ERROR_RATE, None, "http://op:9090", "http://op:9090", id="builtin-operator-prometheus"),
        pytest.param(ERROR_RATE, "http://spec:9090", "http://op:9090", "http://spec:9090", id="spec-wins"),
        pytest.param(spec_mod.PrometheusProvider(query="q", address="http://metric:9090"), "http://spec:9090",
                     "http://op:9090", "http://metric:9090", id="metric-address-wins"),
        pytest.param(spec_mod.PrometheusProvider(query="q"), None, "http://op:9090", "http://op:9090",
                     id="prometheus-operator-address"),
        pytest.param(spec_mod.PrometheusProvider(query="q"), None, None, "unconfigured", id="prometheus-nowhere"),
        pytest.param(spec_mod.ScrapeProvider(metric="x"), "http://spec:9090", "http://op:9090", "scrape",
                     id="scrape-always-scrapes"),
    ],
)
async def test_factory_selects_the_provider(
    provider: spec_mod.MetricProvider, analysis_address: str | None, operator_address: str | None, chosen: str
) -> None:
    factory = providers.Providers(operator_address, allowed_addresses=["http://spec:9090", "http://metric:9090"])
    try:
        m = metric(provider)
        selected = factory.select(m, analysis_spec(m, address=analysis_address))
        if chosen == "scrape":
            assert selected is factory.scrape
        elif chosen == "unconfigured":
            sample = await selected.measure(request("q"))
            assert sample.error is not None and "no Prometheus address" in sample.error
        else:
            assert isinstance(selected, providers.PrometheusProvider) and selected.address == chosen
            assert factory.select(m, analysis_spec(m, address=analysis_address)) is selected  # cached per address
    finally:
        await factory.close()


async def test_factory_queries_candidate_and_stable(prometheus: Server) -> None:
    relative = metric(spec_mod.PrometheusProvider(query='echo:x{version="{{version}}",ns="{{namespace}}"}'),
                      name="relative", rel=0.1)
    absolute = metric(spec_mod.PrometheusProvider(query='echo:y{v="{{version}}",s="{{stableVersion}}"}'),
                      name="absolute", max=100)
    builtin = metric(ERROR_RATE, name="error-rate", rel=0.1)
    spec = analysis_spec(relative, absolute, builtin, address=prometheus.address)
    factory = providers.Providers(namespace_label="namespace", allowed_addresses=[prometheus.address])
    try:
        measured = await factory.query_measurements(
            spec, namespace="ml", name="digits", model="digits", candidate_version="1.10", stable_version="1.9")
    finally:
        await factory.close()
    assert set(measured) == {"relative", "absolute", "error-rate"}
    rel = measured["relative"]
    assert rel.candidate.query == 'echo:x{version="1.10",ns="ml"}'
    assert rel.stable is not None and rel.stable.query == 'echo:x{version="1.9",ns="ml"}'
    assert rel.candidate.value == len(rel.candidate.query) and rel.stable.value == len(rel.stable.query)
    assert measured["absolute"].stable is None  # only measured when compared with it
    assert measured["absolute"].candidate.query == 'echo:y{v="1.10",s="1.9"}'
    err = measured["error-rate"]
    assert err.stable is not None
    assert 'version="1.10"' in err.candidate.query and 'version="1.9"' in err.stable.query
    assert '[60s]' in err.candidate.query and 'namespace="ml"' in err.candidate.query
    assert sorted(prometheus.seen) == sorted([
        rel.candidate.query, rel.stable.query, measured["absolute"].candidate.query,
        err.candidate.query, err.stable.query])


async def test_factory_without_stable_version_measures_only_the_candidate(prometheus: Server) -> None:
    m = metric(spec_mod.PrometheusProvider(query='echo:{{version}}'), rel=0.1)
    factory = providers.Providers(prometheus.address)
    try:
        measured = await factory.query_measurements(
            analysis_spec(m), namespace="ml", name="digits", model="digits", candidate_version="2",
            stable_version=None)
    finally:
        await factory.close()
    assert measured["m"].stable is None and prometheus.seen == ["echo:2"]


async def test_factory_scrapes_builtins_and_feeds_the_evaluator(pods: list[Pod]) -> None:
    """No Prometheus: the builtins come from the pods, and a bad candidate fails the analysis."""
    candidate, stable = pods
    candidate.metrics = runtime_metrics.ServerMetrics("digits", "2.0")
    spec = spec_mod.Analysis(
        metrics=(metric(ERROR_RATE, name="error-rate", rel=0.1), metric(LATENCY, name="p99", max=0.25)),
        interval_seconds=15.0, failure_limit=0)
    clock = Clock()
    factory = providers.Providers(clock=clock)
    now = datetime.datetime(2025, 3, 1, tzinfo=datetime.UTC)
    status: dict[str, Any] | None = None
    try:
        for _ in range(2):
            candidate.serve(ok=50, errors=50)
            stable.serve(ok=100)
            measured = await factory.query_measurements(
                spec, namespace="ml", name="digits", model="digits", candidate_version="2.0", stable_version="1.1",
                candidate_targets=[candidate.server.target], stable_targets=[stable.server.target])
            status = analysis.build_analysis_status(status, spec, "2.0", measured, now, now)
            clock.now += 15
            now += datetime.timedelta(seconds=15)
    finally:
        await factory.close()
    assert status is not None and status["phase"] == "Failed"
    error_rate, p99 = status["metrics"]
    assert (error_rate["lastValue"], error_rate["stableValue"], error_rate["verdict"]) == (0.5, 0.0, "Failed")
    assert p99["verdict"] == "Successful" and p99["lastValue"] == pytest.approx(0.005 + 0.005 * 99 / 100)
    assert error_rate["query"].startswith("scrape of 1 pod(s): 5xx share of shipyard_requests_total")
    json.dumps(status, allow_nan=False)


async def test_factory_never_raises_when_everything_is_down() -> None:
    spec = analysis_spec(
        metric(ERROR_RATE, name="a", rel=0.1),
        metric(spec_mod.PrometheusProvider(query="up"), name="b"),
        address=f"http://127.0.0.1:{closed_port()}",
    )
    factory = providers.Providers(timeout_seconds=1.0)
    try:
        measured = await factory.query_measurements(
            spec, namespace="ml", name="digits", model="digits", candidate_version="2", stable_version="1")
    finally:
        await factory.close()
    samples = [measured["a"].candidate, measured["a"].stable, measured["b"].candidate]
    assert all(s is not None and s.error is not None and s.value is None for s in samples)


async def test_factory_turns_a_bad_request_into_an_error_sample() -> None:
    """Even a metric that cannot be turned into a query (here an unknown builtin) yields a Sample, not a raise."""
    bogus = metric(spec_mod.BuiltinProvider(metric="throughput"), name="bogus")  # type: ignore[arg-type, unused-ignore]
    factory = providers.Providers("http://127.0.0.1:1")
    try:
        measured = await factory.query_measurements(
            analysis_spec(bogus), namespace="ml", name="digits", model="digits", candidate_version="2",
            stable_version="1")
    finally:
        await factory.close()
    sample = measured["bogus"].candidate
    assert sample.value is None and sample.error is not None and "unknown builtin" in sample.error


# --- egress: spec-supplied addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(("analysis_address", "metric_address", "allowed", "namespace", "field"), [
    pytest.param("http://{fake}", None, [], "", "spec.rollout.analysis.prometheus.address", id="analysis-address"),
    pytest.param(None, "http://{fake}", [], "", "spec.rollout.analysis.metrics[1].prometheus.address",
                 id="metric-address"),
    pytest.param("http://user:s3cret@{fake}", None, ["http://{fake}"], "http://{fake}",
                 "spec.rollout.analysis.prometheus.address", id="credentials-refused-even-if-allowed"),
    pytest.param("http://{fake}/../x", None, ["http://{fake}"], "", "spec.rollout.analysis.prometheus.address",
                 id="dot-segment"),
    pytest.param(None, "http://{fake}", ["http://{fake}/sub"], "http://{fake}/other",
                 "spec.rollout.analysis.metrics[1].prometheus.address", id="other-paths-allowed"),
])
async def test_a_refused_spec_address_gets_no_request_and_an_error_naming_the_field(
        prometheus: Server, analysis_address: str | None, metric_address: str | None, allowed: list[str],
        namespace: str, field: str) -> None:
    fake = prometheus.address.removeprefix("http://")
    fill: Callable[[str], str] = lambda text: text.replace("{fake}", fake)  # noqa: E731
    first = metric(spec_mod.PrometheusProvider(query="scrape-me-not"), name="first")
    second = metric(spec_mod.PrometheusProvider(query="echo:1", address=metric_address and fill(metric_address)),
                    name="second")
    spec = analysis_spec(first, second, address=analysis_address and fill(analysis_address))
    factory = providers.Providers("http://operator-prometheus:9090", allowed_addresses=[fill(a) for a in allowed])
    entries, problems = egress.parse_address_list(fill(namespace), "the namespace")
    assert not problems
    try:
        measured = await factory.query_measurements(spec, namespace="ml", name="digits", model="digits",
                                                    candidate_version="2", stable_version="1",
                                                    metric_names=["second"], namespace_allowed=entries)
    finally:
        await factory.close()
    refused = measured["second"].candidate
    assert refused.value is None and refused.error is not None
    assert refused.error.startswith(f"refused: {field}: ") and "s3cret" not in refused.error
    assert prometheus.seen == []  # not one request to the refused address


@pytest.mark.parametrize(("source", "flags", "namespace"), [
    pytest.param("--prometheus-address", [], "", id="operator-address"),
    pytest.param("--allowed-prometheus-address", ["http://{fake}"], "", id="flag"),
    pytest.param("annotation", [], "http://{fake}", id="namespace-annotation"),
])
async def test_an_allowed_spec_address_is_queried(prometheus: Server, source: str, flags: list[str],
                                                  namespace: str) -> None:
    fake = prometheus.address.removeprefix("http://")
    operator = prometheus.address if source == "--prometheus-address" else "http://operator-prometheus:9090"
    m = metric(spec_mod.PrometheusProvider(query="echo:1", address=prometheus.address + "/"))
    factory = providers.Providers(operator, allowed_addresses=[f.replace("{fake}", fake) for f in flags])
    entries, _ = egress.parse_address_list(namespace.replace("{fake}", fake), "annotation")
    assert factory.needs_namespace_allow_list(analysis_spec(m)) is (source == "annotation")
    try:
        measured = await factory.query_measurements(analysis_spec(m), namespace="ml", name="digits", model="digits",
                                                    candidate_version="2", stable_version="1",
                                                    namespace_allowed=entries)
    finally:
        await factory.close()
    assert measured["m"].candidate.error is None and prometheus.seen == ["echo:1"]


def test_invalid_operator_allow_list_entries_stop_the_factory() -> None:
    with pytest.raises(ValueError, match="--allowed-prometheus-address entry http://REDACTED@p:1 carries credentials"):
        providers.Providers(allowed_addresses=["http://u:s3cret@p:1"])


async def test_error_texts_are_redacted_and_capped() -> None:
    """The operator's own address may carry credentials (its configuration): no error text repeats them."""
    m = metric(spec_mod.PrometheusProvider(query="up"))
    factory = providers.Providers(f"http://admin:s3cret@127.0.0.1:{closed_port()}", timeout_seconds=1.0)
    try:
        measured = await factory.query_measurements(analysis_spec(m), namespace="ml", name="digits", model="digits",
                                                    candidate_version="2", stable_version="1")
    finally:
        await factory.close()
    error = measured["m"].candidate.error
    assert error is not None and "s3cret" not in error and "admin" not in error
    assert len(error) <= egress.MAX_ERROR_TEXT
