"""Pulled metric providers against real HTTP servers on 127.0.0.1: a fake Prometheus API, pods serving /metrics and a
JSON endpoint for web metrics, measured through the registry (``providers.Providers``) or a provider module.

Nothing here mocks the HTTP client: every case goes through aiohttp to a local server (or a closed port), and the
assertion is the Sample a provider returns, never an exception. The job provider (pure) is in test_provider_job.py,
the PromQL builders and the scrape arithmetic in test_provider_queries.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web as aiohttp_web

from shipyard import contract
from shipyard.contract import schema
from shipyard.operator import analysis, egress, providers
from shipyard.operator import spec as spec_mod
from shipyard.operator.providers import base
from shipyard.runtime import metrics as runtime_metrics

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[aiohttp_web.Request], Awaitable[aiohttp_web.StreamResponse]]
Provider = str | providers.prometheus.Query | providers.scrape.Scrape | providers.web.Web


@dataclass(frozen=True)
class Received:
    """One request a test server received."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    header_lists: Mapping[str, list[str]]  # every value of each header, by lower-case name
    body: bytes


@dataclass
class Server:
    host: str
    port: int
    runner: aiohttp_web.AppRunner
    seen: list[str] = field(default_factory=list)  # Prometheus: the queries
    received: list[Received] = field(default_factory=list)  # every request, as the server got it

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


async def start(routes: Mapping[str, Handler]) -> Server:
    """A server on 127.0.0.1; routes by ``"[METHOD ]path"`` (GET when no method is given)."""
    app = aiohttp_web.Application()
    for route, handler in routes.items():
        method, _, path = route.rpartition(" ")
        app.router.add_route(method or "GET", path, handler)
    runner = aiohttp_web.AppRunner(app)
    await runner.setup()
    site = aiohttp_web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return Server("127.0.0.1", port, runner)


async def record(server: Server, request: aiohttp_web.Request) -> None:
    lists: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        lists.setdefault(name.lower(), []).append(value)
    server.received.append(Received(method=request.method, path=request.path, query=dict(request.query),
                                    headers=dict(request.headers), header_lists=lists, body=await request.read()))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(provider: Provider, name: str = "m", **thresholds: float) -> spec_mod.Metric:
    """A metric of ``provider`` (a builtin's name or a provider module's spec fragment); default threshold max 1."""
    if not thresholds:
        thresholds = {"max": 1.0}
    kinds: dict[type, str] = {str: "builtin", providers.prometheus.Query: "prometheus",
                              providers.scrape.Scrape: "scrape", providers.web.Web: "web"}
    fields: dict[str, Any] = {kinds[type(provider)]: provider}
    return spec_mod.Metric(name=name, **fields, max=thresholds.get("max"), min=thresholds.get("min"),
                           max_relative_to_stable=thresholds.get("rel"))


def query(text: str, address: str | None = None) -> providers.prometheus.Query:
    return providers.prometheus.Query(query=text, address=address)


def analysis_spec(*metrics: spec_mod.Metric, address: str | None = None, **fields: Any) -> spec_mod.Analysis:
    prometheus = None if address is None else spec_mod.PrometheusDefault(address=address)
    return spec_mod.Analysis(metrics=metrics, interval="15s", prometheus=prometheus, **fields)


def request(m: spec_mod.Metric, targets: Sequence[str] = (), version: str = "1.1", *,
            stable_version: str | None = None, spec: spec_mod.Analysis | None = None,
            namespace: str = "ml", name: str = "digits") -> base.MeasurementRequest:
    return base.MeasurementRequest(namespace=namespace, name=name, metric=m, analysis=spec or analysis_spec(m),
                                   model="digits", version=version, stable_version=stable_version,
                                   targets=tuple(targets))


@contextlib.asynccontextmanager
async def registry(prometheus_address: str | None = None, **options: Any) -> AsyncIterator[providers.Providers]:
    """The per-process providers, closed afterwards."""
    factory = providers.Providers(prometheus_address, **options)
    try:
        yield factory
    finally:
        await factory.close()


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
PREFIXES = ("", "/prefix", "/op", "/spec", "/metric")  # the same API under several base paths (several "Prometheis")


@pytest.fixture
async def prometheus() -> AsyncIterator[Server]:
    server: Server

    async def handle(request: aiohttp_web.Request) -> aiohttp_web.StreamResponse:
        await record(server, request)
        q = request.query.get("query", "")
        server.seen.append(q)
        if q == "slow":
            await asyncio.sleep(2.0)
        if q.startswith("echo:"):  # the value is the query's length, to tell candidate and stable apart
            return aiohttp_web.json_response(vector(str(float(len(q)))))
        status, body = PROMETHEUS_ANSWERS.get(q, PROMETHEUS_ANSWERS["vector"])
        return aiohttp_web.Response(status=status, text=body, content_type="application/json")

    server = await start({f"{prefix}/api/v1/query": handle for prefix in PREFIXES})
    yield server
    await server.runner.cleanup()


@pytest.mark.parametrize(
    ("query_text", "value", "error"),
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
async def test_prometheus_answers(prometheus: Server, query_text: str, value: float | None,
                                  error: str | None) -> None:
    async with registry(prometheus.address) as factory:
        sample = await factory.measure(request(metric(query(query_text))))
    assert prometheus.seen == [query_text]
    assert sample.query == query_text
    assert sample.value == value
    if error is None:
        assert sample.error is None
    else:
        assert sample.error is not None and error in sample.error


async def test_prometheus_timeout(prometheus: Server) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with registry(prometheus.address, timeout_seconds=0.2) as factory:
        sample = await factory.measure(request(metric(query("slow"))))
    assert loop.time() - started < 1.5
    assert sample.value is None and sample.error is not None and "timed out after 0.2s" in sample.error


async def test_prometheus_connection_refused() -> None:
    async with registry(f"http://127.0.0.1:{closed_port()}") as factory:
        sample = await factory.measure(request(metric(query("vector"))))
    assert sample.value is None and sample.error is not None and "could not fetch" in sample.error


async def test_prometheus_address_with_path_prefix(prometheus: Server) -> None:
    async with registry(prometheus.address + "/prefix/") as factory:
        sample = await factory.measure(request(metric(query('sum(rate(x{version="{{version}}"}[1m]))'))))
    assert sample.value == 0.25 and sample.error is None
    assert prometheus.seen == ['sum(rate(x{version="1.1"}[1m]))']  # rendered, sent verbatim (URL-encoded on the way)
    assert [r.path for r in prometheus.received] == ["/prefix/api/v1/query"]


async def test_prometheus_module_queries_an_address_of_its_env(prometheus: Server) -> None:
    """``query_prometheus`` is the module's I/O: (value, error) of one instant query at any address it is given."""
    env = base.Env(prometheus_address=None)
    try:
        assert await providers.prometheus.query_prometheus(env, prometheus.address + "/spec/", "scalar") == (3.5, None)
        value, error = await providers.prometheus.query_prometheus(env, prometheus.address, "two-series")
    finally:
        await env.http.close()
    assert value is None and error is not None and "2 series" in error
    assert [(r.path, r.query["query"]) for r in prometheus.received] == [
        ("/spec/api/v1/query", "scalar"), ("/api/v1/query", "two-series")]


async def test_prometheus_wrong_path_is_an_error(prometheus: Server) -> None:
    async with registry(prometheus.address + "/nowhere") as factory:
        sample = await factory.measure(request(metric(query("vector"))))
    assert sample.error is not None and "HTTP 404" in sample.error


async def test_oversized_response_is_an_error(prometheus: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "MAX_RESPONSE_BYTES", 10)
    async with registry(prometheus.address) as factory:
        sample = await factory.measure(request(metric(query("vector"))))
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
        async def handler(request: aiohttp_web.Request) -> aiohttp_web.StreamResponse:
            pod = out[index]
            await record(pod.server, request)
            if pod.body is not None:
                return aiohttp_web.Response(status=pod.status, text=pod.body)
            return aiohttp_web.Response(status=pod.status, body=pod.metrics.build_exposition(),
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


ERROR_RATE = "errorRate"
LATENCY = "latencyP99"


async def scrape(factory: providers.Providers, pods: list[Pod], what: Provider,
                 version: str = "1.1") -> analysis.Sample:
    """One measurement of ``what`` on ``pods``, through the registry (a builtin is scraped: no Prometheus)."""
    return await factory.measure(request(metric(what), [p.server.target for p in pods], version))


async def test_scrape_error_rate_over_intervals_with_a_restart(pods: list[Pod]) -> None:
    clock = Clock()
    async with registry(clock=clock) as factory:
        a, b = pods
        a.serve(ok=90, errors=10)
        b.serve(ok=100)
        first = await scrape(factory, pods, ERROR_RATE)
        assert first.error is None and first.value == pytest.approx(10 / 200)
        assert "since the pods started" in first.query and "scrape of 2 pod(s)" in first.query

        a.serve(ok=10)
        b.serve(ok=5, errors=5)
        clock.now += 15
        second = await scrape(factory, pods, ERROR_RATE)
        assert second.value == pytest.approx(5 / 20)
        assert "over the last 15s" in second.query

        b.restart()  # counters back to zero: the reset is detected per series, not summed away
        b.serve(ok=3, errors=1)
        a.serve(ok=6)
        clock.now += 15
        third = await scrape(factory, pods, ERROR_RATE)
        assert third.value == pytest.approx(1 / 10)

        clock.now += 15
        idle = await scrape(factory, pods, ERROR_RATE)
        assert idle.value is None and idle.error is None  # no requests in the interval: no data


async def test_scrape_latency_p99(pods: list[Pod]) -> None:
    clock = Clock()
    async with registry(clock=clock) as factory:
        a, b = pods
        a.serve(ok=50, latency=0.003)  # bucket (0.0025, 0.005]
        b.serve(ok=50, latency=0.003)
        first = await scrape(factory, pods, LATENCY)
        assert first.value == pytest.approx(0.0025 + 0.0025 * 99 / 100)

        a.serve(ok=98, latency=0.003)
        b.serve(ok=2, latency=0.4)  # bucket (0.25, 0.5]: ranks 99-100 of 100
        clock.now += 15
        second = await scrape(factory, pods, LATENCY)
        assert second.value == pytest.approx(0.25 + 0.25 * 1 / 2)


async def test_scrape_filters_model_and_version(pods: list[Pod]) -> None:
    async with registry() as factory:
        pods[0].serve(ok=5, errors=5)
        sample = await scrape(factory, pods, ERROR_RATE, version="9.9")  # pods export version 1.1
    assert sample.value is None and sample.error is None


async def test_scrape_user_metrics(pods: list[Pod]) -> None:
    clock = Clock()
    inflight = providers.scrape.Scrape(metric=contract.METRIC_INFLIGHT, aggregation="max")
    rate = providers.scrape.Scrape(metric=contract.METRIC_REQUESTS_TOTAL, labels={"code": "200"}, rate=True)
    async with registry(clock=clock) as factory:
        a, b = pods
        a.metrics.inflight.set(3)
        b.metrics.inflight.set(7)
        assert (await scrape(factory, pods, inflight)).value == 7.0
        a.serve(ok=10)
        b.serve(ok=1)
        first = await scrape(factory, pods, rate)
        assert first.value is None and first.error is None and "first scrape" in first.query
        a.serve(ok=20)
        b.serve(ok=10, errors=50)
        clock.now += 10
        assert (await scrape(factory, pods, rate)).value == pytest.approx(3.0)


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
    async with registry(clock=clock) as factory:
        a, b = pods
        a.serve(ok=10)
        b.serve(ok=10)
        assert (await scrape(factory, pods, ERROR_RATE)).value == 0.0
        b.status, b.body = status, body
        a.serve(errors=10)
        clock.now += 15
        broken = await scrape(factory, pods, ERROR_RATE)
        assert broken.value is None and broken.error is not None and error in broken.error
        b.status, b.body = 200, None
        b.serve(ok=10)
        clock.now += 15
        recovered = await scrape(factory, pods, ERROR_RATE)
        assert recovered.value == pytest.approx(10 / 20)  # measured against the last good snapshot
        assert "over the last 30s" in recovered.query


async def test_scrape_pod_down_and_no_pods(pods: list[Pod]) -> None:
    m = metric(ERROR_RATE)
    async with registry(timeout_seconds=1.0) as factory:
        down = await factory.measure(request(m, (pods[0].server.target, f"127.0.0.1:{closed_port()}")))
        none = await factory.measure(request(m, ()))
    assert down.value is None and down.error is not None and "could not fetch" in down.error
    assert none.value is None and none.error is None and "no ready pods" in none.query


async def test_scrape_does_not_follow_redirects(pods: list[Pod]) -> None:
    """A pod cannot send the operator elsewhere: a redirect is an error, not followed."""
    elsewhere = pods[1].server.address + contract.PATH_METRICS

    async def redirect(request: aiohttp_web.Request) -> aiohttp_web.StreamResponse:
        raise aiohttp_web.HTTPFound(elsewhere)

    server = await start({"/metrics": redirect})
    try:
        async with registry() as factory:
            pods[1].serve(ok=10)
            sample = await factory.measure(request(metric(ERROR_RATE), (server.target,)))
    finally:
        await server.runner.cleanup()
    assert sample.value is None and sample.error is not None and "HTTP 302" in sample.error
    assert pods[1].server.received == []  # the redirect's target never asked


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
        providers.scrape.build_scrape_url(target)
    async with registry() as factory:
        sample = await factory.measure(request(metric(ERROR_RATE), (target,)))
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
    assert providers.scrape.build_scrape_url(target) == url


# ---------------------------------------------------------------------------------------------------------------
# The registry: which backend and which address measure a metric


@pytest.mark.parametrize(
    ("provider", "metric_prefix", "analysis_prefix", "operator_prefix", "chosen"),
    [  # prefixes name base paths of the fake Prometheus; the spec's are on the operator's allow-list
        pytest.param(ERROR_RATE, None, None, None, "scrape", id="builtin-without-prometheus-scrapes"),
        pytest.param(ERROR_RATE, None, None, "/op", "/op", id="builtin-operator-prometheus"),
        pytest.param(ERROR_RATE, None, "/spec", "/op", "/spec", id="spec-wins"),
        pytest.param(query("q"), "/metric", "/spec", "/op", "/metric", id="metric-address-wins"),
        pytest.param(query("q"), None, None, "/op", "/op", id="prometheus-operator-address"),
        pytest.param(query("q"), None, "/spec", "/op", "/spec", id="prometheus-analysis-address"),
        pytest.param(query("q"), None, None, None, "unconfigured", id="prometheus-nowhere"),
        pytest.param(providers.scrape.Scrape(metric="x"), None, "/spec", "/op", "scrape",
                     id="scrape-always-scrapes"),
    ],
)
async def test_registry_chooses_the_backend_and_the_address(
    prometheus: Server, provider: Provider, metric_prefix: str | None, analysis_prefix: str | None,
    operator_prefix: str | None, chosen: str
) -> None:
    if metric_prefix is not None:
        assert isinstance(provider, providers.prometheus.Query)
        provider = query(provider.query, address=prometheus.address + metric_prefix)
    m = metric(provider)
    spec = analysis_spec(m, address=None if analysis_prefix is None else prometheus.address + analysis_prefix)
    operator = None if operator_prefix is None else prometheus.address + operator_prefix
    allowed = [prometheus.address + "/spec", prometheus.address + "/metric"]
    async with registry(operator, allowed_addresses=allowed) as factory:
        uses_pods = factory.uses_pods(spec)
        sample = await factory.measure(request(m, spec=spec))
    assert providers.backend_of(m).key == m.provider_key
    assert uses_pods is (chosen == "scrape")
    if chosen == "scrape":
        assert sample.error is None and sample.value is None
        assert sample.query.startswith("scrape of 0 pod(s): ") and sample.query.endswith(": no ready pods")
        assert prometheus.received == []
    elif chosen == "unconfigured":
        assert sample.error is not None and "no Prometheus address" in sample.error
        assert prometheus.received == []
    else:
        assert sample.error is None and sample.value == 0.25
        assert [r.path for r in prometheus.received] == [f"{chosen}/api/v1/query"]


async def test_registry_queries_candidate_and_stable(prometheus: Server) -> None:
    relative = metric(query('echo:x{version="{{version}}",ns="{{namespace}}"}'), name="relative", rel=0.1)
    absolute = metric(query('echo:y{v="{{version}}",s="{{stableVersion}}"}'), name="absolute", max=100)
    builtin = metric(ERROR_RATE, name="error-rate", rel=0.1)
    spec = analysis_spec(relative, absolute, builtin, address=prometheus.address)
    async with registry(namespace_label="namespace", allowed_addresses=[prometheus.address]) as factory:
        measured = await factory.query_measurements(
            spec, namespace="ml", name="digits", model="digits", candidate_version="1.10", stable_version="1.9")
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


async def test_registry_without_stable_version_measures_only_the_candidate(prometheus: Server) -> None:
    m = metric(query('echo:{{version}}'), rel=0.1)
    async with registry(prometheus.address) as factory:
        measured = await factory.query_measurements(
            analysis_spec(m), namespace="ml", name="digits", model="digits", candidate_version="2",
            stable_version=None)
    assert measured["m"].stable is None and prometheus.seen == ["echo:2"]


async def test_registry_measures_only_the_named_pulled_metrics(prometheus: Server) -> None:
    """``metric_names`` picks metrics; a job metric is never pulled (its Job is the planner's)."""
    job = spec_mod.Metric(name="job", job=providers.job.Job(template={"spec": {"containers": [{"name": "c"}]}}))
    spec = analysis_spec(metric(query("echo:a"), name="a"), metric(query("echo:bb"), name="b"), job)
    async with registry(prometheus.address) as factory:
        every = await factory.query_measurements(spec, namespace="ml", name="digits", model="digits",
                                                 candidate_version="2", stable_version="1")
        named = await factory.query_measurements(spec, namespace="ml", name="digits", model="digits",
                                                 candidate_version="2", stable_version="1",
                                                 metric_names=["b", "job"])
    assert set(every) == {"a", "b"} and set(named) == {"b"}
    assert [m.name for m in providers.plan_pulled(spec)] == ["a", "b"]
    assert prometheus.seen == ["echo:a", "echo:bb", "echo:bb"]


async def test_registry_scrapes_builtins_and_feeds_the_evaluator(pods: list[Pod]) -> None:
    """No Prometheus: the builtins come from the pods, and a bad candidate fails the analysis."""
    candidate, stable = pods
    candidate.metrics = runtime_metrics.ServerMetrics("digits", "2.0")
    spec = analysis_spec(metric(ERROR_RATE, name="error-rate", rel=0.1), metric(LATENCY, name="p99", max=0.25),
                         failure_limit=0)
    clock = Clock()
    now = datetime.datetime(2025, 3, 1, tzinfo=datetime.UTC)
    status: dict[str, Any] | None = None
    async with registry(clock=clock) as factory:
        for _ in range(2):
            candidate.serve(ok=50, errors=50)
            stable.serve(ok=100)
            measured = await factory.query_measurements(
                spec, namespace="ml", name="digits", model="digits", candidate_version="2.0", stable_version="1.1",
                candidate_targets=[candidate.server.target], stable_targets=[stable.server.target])
            status = analysis.build_analysis_status(status, spec, "2.0", measured, now, now)
            clock.now += 15
            now += datetime.timedelta(seconds=15)
    assert status is not None and status["phase"] == "Failed"
    error_rate, p99 = status["metrics"]
    assert (error_rate["lastValue"], error_rate["stableValue"], error_rate["verdict"]) == (0.5, 0.0, "Failed")
    assert p99["verdict"] == "Successful" and p99["lastValue"] == pytest.approx(0.005 + 0.005 * 99 / 100)
    assert error_rate["query"].startswith("scrape of 1 pod(s): 5xx share of shipyard_requests_total")
    json.dumps(status, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# The registry never raises into the reconciler


async def test_registry_never_raises_when_everything_is_down() -> None:
    """Every pulled backend pointed at a closed port (allowed, so really contacted): Error samples, no raise."""
    down = f"http://127.0.0.1:{closed_port()}"
    spec = analysis_spec(
        metric(ERROR_RATE, name="a", rel=0.1),
        metric(query("up"), name="b"),
        metric(providers.web.Web(url=down + "/score", json_path="$.x"), name="c"),
        metric(providers.scrape.Scrape(metric="x"), name="d"),
        address=down,
    )
    async with registry(timeout_seconds=1.0, allowed_addresses=[down]) as factory:
        measured = await factory.query_measurements(
            spec, namespace="ml", name="digits", model="digits", candidate_version="2", stable_version="1",
            candidate_targets=[down.removeprefix("http://")], stable_targets=[down.removeprefix("http://")])
    samples = [measured["a"].candidate, measured["a"].stable, measured["b"].candidate, measured["c"].candidate,
               measured["d"].candidate]
    for sample in samples:
        assert sample is not None and sample.value is None
        assert sample.error is not None and "could not fetch" in sample.error, sample


class Boom(Exception):
    pass


@pytest.mark.parametrize(("broken", "error"), [
    pytest.param("unknown-builtin", "unknown builtin metric 'throughput'", id="value-error-of-a-request"),
    pytest.param("internal", "internal error: Boom: broke at http://REDACTED@x/", id="bug-in-a-backend"),
    pytest.param("planned", "internal error: AssertionError", id="planned-backend-pulled"),
])
async def test_registry_turns_any_exception_into_an_error_sample(
        monkeypatch: pytest.MonkeyPatch, broken: str, error: str) -> None:
    """A metric that cannot become a query (an unknown builtin past admission), a backend that raises, a planned
    backend asked to measure: each yields an Error sample, redacted; nothing raises."""
    if broken == "unknown-builtin":
        m = spec_mod.Metric.model_construct(name="bogus", builtin="throughput", max=1.0)
    elif broken == "internal":
        async def boom(self: object, request: base.MeasurementRequest, env: base.Env) -> analysis.Sample:
            raise Boom("broke at http://u:s3cret@x/")

        monkeypatch.setattr(providers.scrape.ScrapeBackend, "measure", boom)
        m = metric(providers.scrape.Scrape(metric="x"), name="bogus")
    else:
        m = spec_mod.Metric(name="bogus", job=providers.job.Job(template={"spec": {"containers": [{"name": "c"}]}}))
    async with registry("http://127.0.0.1:1") as factory:
        sample = await factory.measure(request(m))
    assert sample.value is None and sample.error is not None and sample.error.startswith(error)
    assert "s3cret" not in sample.error


async def test_registry_lets_cancellation_through(prometheus: Server) -> None:
    """Only cancellation propagates: a reconciler cancelled while measuring stops at once."""
    async with registry(prometheus.address) as factory:
        task = asyncio.create_task(factory.measure(request(metric(query("slow")))))
        while not prometheus.seen:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------------------------------------------------
# Egress: spec-supplied Prometheus addresses


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

    def fill(text: str) -> str:
        return text.replace("{fake}", fake)

    first = metric(query("scrape-me-not"), name="first")
    second = metric(query("echo:1", address=metric_address and fill(metric_address)), name="second")
    spec = analysis_spec(first, second, address=analysis_address and fill(analysis_address))
    entries, problems = egress.parse_address_list(fill(namespace), "the namespace")
    assert not problems
    async with registry("http://operator-prometheus:9090", allowed_addresses=[fill(a) for a in allowed]) as factory:
        measured = await factory.query_measurements(spec, namespace="ml", name="digits", model="digits",
                                                    candidate_version="2", stable_version="1",
                                                    metric_names=["second"], namespace_allowed=entries)
    refused = measured["second"].candidate
    assert refused.value is None and refused.error is not None
    assert refused.error.startswith(f"refused: {field}: ") and "s3cret" not in refused.error
    assert prometheus.received == []  # not one request to the refused address


@pytest.mark.parametrize(("source", "flags", "namespace"), [
    pytest.param("--prometheus-address", [], "", id="operator-address"),
    pytest.param("--allowed-prometheus-address", ["http://{fake}"], "", id="flag"),
    pytest.param("annotation", [], "http://{fake}", id="namespace-annotation"),
])
async def test_an_allowed_spec_address_is_queried(prometheus: Server, source: str, flags: list[str],
                                                  namespace: str) -> None:
    fake = prometheus.address.removeprefix("http://")
    operator = prometheus.address if source == "--prometheus-address" else "http://operator-prometheus:9090"
    m = metric(query("echo:1", address=prometheus.address + "/"))
    entries, _ = egress.parse_address_list(namespace.replace("{fake}", fake), "annotation")
    async with registry(operator, allowed_addresses=[f.replace("{fake}", fake) for f in flags]) as factory:
        assert factory.needs_namespace_allow_list(analysis_spec(m)) is (source == "annotation")
        measured = await factory.query_measurements(analysis_spec(m), namespace="ml", name="digits", model="digits",
                                                    candidate_version="2", stable_version="1",
                                                    namespace_allowed=entries)
    assert measured["m"].candidate.error is None and prometheus.seen == ["echo:1"]


def test_invalid_operator_allow_list_entries_stop_the_registry() -> None:
    with pytest.raises(ValueError, match="--allowed-prometheus-address entry http://REDACTED@p:1 carries credentials"):
        providers.Providers(allowed_addresses=["http://u:s3cret@p:1"])


async def test_error_texts_are_redacted_and_capped() -> None:
    """The operator's own address may carry credentials (its configuration): no error text repeats them."""
    m = metric(query("up"))
    async with registry(f"http://admin:s3cret@127.0.0.1:{closed_port()}", timeout_seconds=1.0) as factory:
        measured = await factory.query_measurements(analysis_spec(m), namespace="ml", name="digits", model="digits",
                                                    candidate_version="2", stable_version="1")
    error = measured["m"].candidate.error
    assert error is not None and "s3cret" not in error and "admin" not in error
    assert len(error) <= egress.MAX_ERROR_TEXT


# ---------------------------------------------------------------------------------------------------------------
# Web metrics: a JSON endpoint, the value by JSONPath

DOCUMENT: dict[str, Any] = {
    "data": {"score": 0.93, "int": 7, "text": "0.5", "ok": True, "off": False, "none": None, "nan": "NaN",
             "obj": {"a": 1}, "list": [1, 2], "word": "high", "empty": ""},
    "items": [{"name": "accuracy", "value": 0.8}, {"name": "f1", "value": 0.7}],
}


@dataclass
class Answer:
    status: int = 200
    text: str = json.dumps(DOCUMENT)
    content_type: str = "application/json"
    delay: float = 0.0


@pytest.fixture
async def endpoint() -> AsyncIterator[Server]:
    """A JSON endpoint: ``/score`` (and ``/api/{anything}/score``) answers ``answer``, ``/redirect`` sends to
    ``/score``; every request is recorded."""
    server: Server
    answer = Answer()

    async def score(request: aiohttp_web.Request) -> aiohttp_web.StreamResponse:
        await record(server, request)
        if answer.delay:
            await asyncio.sleep(answer.delay)
        return aiohttp_web.Response(status=answer.status, text=answer.text, content_type=answer.content_type)

    async def redirect(request: aiohttp_web.Request) -> aiohttp_web.StreamResponse:
        await record(server, request)
        raise aiohttp_web.HTTPFound("/score")

    server = await start({"GET /score": score, "POST /score": score, "GET /api/{tail:.*}": score,
                          "GET /redirect": redirect, "POST /redirect": redirect})
    server.answer = answer  # type: ignore[attr-defined]
    yield server
    await server.runner.cleanup()


def answer(server: Server) -> Answer:
    found: Answer = server.answer  # type: ignore[attr-defined]
    return found


def web_metric(url: str, json_path: str = "$.data.score", name: str = "m", **fields: Any) -> spec_mod.Metric:
    return metric(providers.web.Web(url=url, json_path=json_path, **fields), name=name)


async def measure_web(server: Server, m: spec_mod.Metric, **request_fields: Any) -> analysis.Sample:
    """One measurement through the registry, the endpoint's server on the operator's allow-list."""
    async with registry(allowed_addresses=[server.address]) as factory:
        return await factory.measure(request(m, **request_fields))


async def test_web_get_renders_the_url_and_sends_the_headers(endpoint: Server) -> None:
    m = web_metric(endpoint.address + "/api/{{namespace}}/{{name}}/score?v={{version}}&s={{stableVersion}}",
                   headers=(providers.web.Header(name="Accept", value="application/json"),
                            providers.web.Header(name="X-Tenant", value="team a")))
    sample = await measure_web(endpoint, m, version='1.0 &x=/"#', stable_version="0.9")
    assert sample.error is None and sample.value == 0.93
    [received] = endpoint.received
    assert (received.method, received.path, received.body) == ("GET", "/api/ml/digits/score", b"")
    assert received.query == {"v": '1.0 &x=/"#', "s": "0.9"}  # URL-encoded: one parameter each, nothing injected
    assert received.headers["Accept"] == "application/json" and received.headers["X-Tenant"] == "team a"
    assert sample.query.startswith(f"GET {endpoint.address}/api/ml/digits/score?") and sample.query.endswith(
        " $.data.score")


async def test_web_without_a_stable_version_renders_it_empty(endpoint: Server) -> None:
    sample = await measure_web(endpoint, web_metric(endpoint.address + "/score?s={{stableVersion}}&v={{version}}"))
    assert sample.value == 0.93 and endpoint.received[0].query == {"s": "", "v": "1.1"}


@pytest.mark.parametrize(("headers", "content_type"), [
    pytest.param((), "application/json", id="json-by-default"),
    pytest.param((providers.web.Header(name="Content-Type", value="application/vnd.api+json"),),
                 "application/vnd.api+json", id="own-content-type"),
    pytest.param((providers.web.Header(name="content-type", value="application/vnd.api+json"),),
                 "application/vnd.api+json", id="own-content-type-any-case"),
])
async def test_web_post_renders_the_body(endpoint: Server, headers: tuple[providers.web.Header, ...],
                                         content_type: str) -> None:
    body = '{"version": "{{version}}", "model": "{{namespace}}/{{name}}", "stable": "{{stableVersion}}", "n": 1}'
    m = web_metric(endpoint.address + "/score", method="POST", body=body, headers=headers)
    version = 'a"b\\c\n}, "n": 2, "x": {"'  # JSON-escaped: stays one string, cannot add or change fields
    sample = await measure_web(endpoint, m, version=version, stable_version="1.0")
    assert sample.error is None and sample.value == 0.93 and sample.query.startswith("POST ")
    [received] = endpoint.received
    assert received.method == "POST"
    assert json.loads(received.body) == {"version": version, "model": "ml/digits", "stable": "1.0", "n": 1}
    assert received.header_lists["content-type"] == [content_type]


async def test_web_post_without_a_body_sends_an_empty_one(endpoint: Server) -> None:
    sample = await measure_web(endpoint, web_metric(endpoint.address + "/score", method="POST"))
    assert sample.value == 0.93 and endpoint.received[0].method == "POST" and endpoint.received[0].body == b""


@pytest.mark.parametrize(("json_path", "value", "error"), [
    pytest.param("$.data.score", 0.93, None, id="number"),
    pytest.param("$.data.int", 7.0, None, id="integer"),
    pytest.param("$.data.text", 0.5, None, id="numeric-string"),
    pytest.param("$.data.ok", 1.0, None, id="true-is-1"),
    pytest.param("$.data.off", 0.0, None, id="false-is-0"),
    pytest.param("$.data.list[1]", 2.0, None, id="list-element"),
    pytest.param("$.items[?(@.name=='f1')].value", 0.7, None, id="filter"),
    pytest.param("$..value", 0.8, None, id="first-of-several-matches"),
    pytest.param("$.data.none", None, None, id="null-no-data"),
    pytest.param("$.data.missing", None, None, id="no-match-no-data"),
    pytest.param("$.data.nan", None, None, id="nan-string-no-data"),
    pytest.param("$.data.obj", None, "jsonPath '$.data.obj' matched an object, not a number", id="object"),
    pytest.param("$.data.list", None, "jsonPath '$.data.list' matched a list, not a number", id="list"),
    pytest.param("$.data.word", None, "matched the string 'high', not a number", id="non-numeric-string"),
    pytest.param("$.data.empty", None, "matched the string '', not a number", id="empty-string"),
    pytest.param("$.data[", None, "jsonPath '$.data[' is invalid", id="invalid-path"),
    pytest.param("$$", None, "jsonPath '$$' is invalid", id="invalid-token"),
])
async def test_web_json_path_values(endpoint: Server, json_path: str, value: float | None,
                                    error: str | None) -> None:
    sample = await measure_web(endpoint, web_metric(endpoint.address + "/score", json_path))
    assert len(endpoint.received) == 1
    assert sample.value == value
    if error is None:
        assert sample.error is None and sample.query == f"GET {endpoint.address}/score {json_path}"
    else:
        assert sample.error is not None and error in sample.error


@pytest.mark.parametrize(("status", "text", "content_type", "value", "error"), [
    pytest.param(201, json.dumps({"data": {"score": 2}}), "application/json", 2.0, None, id="any-2xx"),
    pytest.param(500, json.dumps({"data": {"score": 2}}), "application/json", None, "HTTP 500 from", id="http-500"),
    pytest.param(404, "no such page", "text/plain", None, "HTTP 404 from", id="http-404"),
    pytest.param(200, "<html>not json{", "text/html", None, "is not JSON: <html>not json{", id="not-json"),
    pytest.param(200, "", "application/json", None, "is not JSON", id="empty-body"),
    pytest.param(200, "0.5", "application/json", None, None, id="bare-number-document-no-match"),
])
async def test_web_status_and_body(endpoint: Server, status: int, text: str, content_type: str,
                                   value: float | None, error: str | None) -> None:
    reply = answer(endpoint)
    reply.status, reply.text, reply.content_type = status, text, content_type
    sample = await measure_web(endpoint, web_metric(endpoint.address + "/score"))
    assert sample.value == value
    if error is None:
        assert sample.error is None
    else:
        assert sample.error is not None and error in sample.error


async def test_web_does_not_follow_redirects(endpoint: Server) -> None:
    """A redirect could leave the allowed address: it is an Error, and its target is never asked."""
    sample = await measure_web(endpoint, web_metric(endpoint.address + "/redirect"))
    assert sample.value is None and sample.error is not None and "HTTP 302" in sample.error
    assert [r.path for r in endpoint.received] == ["/redirect"]


async def test_web_timeout_is_the_metrics_own(endpoint: Server) -> None:
    answer(endpoint).delay = 5.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    sample = await measure_web(endpoint, web_metric(endpoint.address + "/score", timeout_seconds=1))
    assert loop.time() - started < 3.0
    assert sample.value is None and sample.error is not None and "timed out after 1s" in sample.error


async def test_web_oversized_response_is_an_error(endpoint: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "MAX_RESPONSE_BYTES", 100)
    answer(endpoint).text = json.dumps({"data": {"score": 1, "pad": "x" * 200}})
    sample = await measure_web(endpoint, web_metric(endpoint.address + "/score"))
    assert sample.value is None and sample.error is not None and "larger than 100 bytes" in sample.error


async def test_web_connection_refused() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    async with registry(allowed_addresses=[url]) as factory:
        sample = await factory.measure(request(web_metric(url + "/score")))
    assert sample.value is None and sample.error is not None and "could not fetch" in sample.error


# --- egress: the url must be on an allow-list ----------------------------------------------------------------------


@pytest.mark.parametrize(("url", "flags", "namespace", "problem"), [
    pytest.param("{fake}/score", [], "", f"is not an allowed web metric address: {egress.RULE}", id="not-listed"),
    pytest.param("{fake}/score", ["{fake}/api"], "{fake}/other", "is not an allowed web metric address",
                 id="other-paths-listed"),
    pytest.param("{fake}/api/../score", ["{fake}/api"], "", "has a '.' or '..' segment", id="dot-segment"),
    pytest.param("http://u:s3cret@{host}/score", ["{fake}"], "{fake}", "carries credentials",
                 id="credentials-even-if-listed"),
    # the request's name is "localhost", which renders the host to the test's server, not to the listed one
    pytest.param("http://{{name}}:{port}/score", ["http://digits:{port}"], "http://digits:{port}", "",
                 id="placeholder-moving-the-host-off-the-list"),
])
async def test_a_web_url_not_allowed_gets_no_request_and_an_error_naming_the_field_and_rule(
        endpoint: Server, url: str, flags: list[str], namespace: str, problem: str) -> None:
    def fill(text: str) -> str:
        return (text.replace("{fake}", endpoint.address).replace("{host}", endpoint.target)
                .replace("{port}", str(endpoint.port)))

    first = web_metric(endpoint.address + "/score", name="first")
    second = web_metric(fill(url), name="second")
    spec = analysis_spec(first, second)
    entries, problems = egress.parse_address_list(fill(namespace), egress.ANNOTATION_ALLOWED)
    assert not problems
    async with registry(allowed_addresses=[fill(f) for f in flags]) as factory:
        # the annotation is read unless the url is refused whatever it says (credentials)
        assert factory.needs_namespace_allow_list(analysis_spec(second)) is ("s3cret" not in url)
        measured = await factory.query_measurements(spec, namespace="ml", name="localhost", model="digits",
                                                    candidate_version="2", stable_version="1",
                                                    metric_names=["second"], namespace_allowed=entries)
    refused = measured["second"].candidate
    assert refused.value is None and refused.error is not None
    assert refused.error.startswith("refused: spec.rollout.analysis.metrics[1].web.url: ")
    assert problem in refused.error and "s3cret" not in refused.error
    assert endpoint.received == []  # not one request


async def test_a_placeholder_moving_the_host_off_the_allow_list_is_refused_after_rendering(endpoint: Server) -> None:
    """The backend checks the rendered url (not only the template the registry checks): a name that renders the
    host to somewhere else gets no request."""
    m = web_metric(f"http://{{{{name}}}}:{endpoint.port}/score")
    env = base.Env(prometheus_address=None, allowed=egress.parse_address_list(
        f"http://digits:{endpoint.port}", egress.FLAG_ALLOWED)[0])
    try:
        sample = await providers.web.BACKEND.measure(request(m, name="localhost"), env)
    finally:
        await env.http.close()
    assert sample.value is None and sample.error is not None
    assert sample.error.startswith(f"refused: spec.rollout.analysis.metrics[0].web.url: http://localhost:{endpoint.port}"
                                   "/score is not an allowed web metric address")
    assert endpoint.received == []


@pytest.mark.parametrize(("operator", "flags", "namespace"), [
    pytest.param("{fake}", [], "", id="operator-prometheus-address"),
    pytest.param(None, ["{fake}/score"], "", id="flag-for-the-endpoint"),
    pytest.param(None, [], "{fake}", id="namespace-annotation"),
])
async def test_an_allowed_web_url_with_a_query_string_is_measured(
        endpoint: Server, operator: str | None, flags: list[str], namespace: str) -> None:
    """The rule matches the endpoint (scheme, host, port, path); the query string is the request's own."""
    def fill(text: str) -> str:
        return text.replace("{fake}", endpoint.address)

    m = web_metric(endpoint.address + "/score?version={{version}}&debug=true")
    entries, _ = egress.parse_address_list(fill(namespace), egress.ANNOTATION_ALLOWED)
    async with registry(operator and fill(operator), allowed_addresses=[fill(f) for f in flags]) as factory:
        assert factory.needs_namespace_allow_list(analysis_spec(m)) is bool(namespace)
        measured = await factory.query_measurements(analysis_spec(m), namespace="ml", name="digits", model="digits",
                                                    candidate_version="2", stable_version="1",
                                                    namespace_allowed=entries)
    assert measured["m"].candidate.error is None and measured["m"].candidate.value == 0.93
    assert [r.query for r in endpoint.received] == [{"version": "2", "debug": "true"}]


# --- the spec fragment ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fragment", "problem"), [
    pytest.param({"headers": [{"name": "Authorization", "value": "Bearer x"}]},
                 "headers[0].name: credentials never belong in a spec", id="authorization"),
    pytest.param({"headers": [{"name": "Accept", "value": "*/*"}, {"name": "authorization", "value": "x"}]},
                 "headers[1].name: credentials never belong in a spec", id="authorization-any-case"),
    pytest.param({"headers": [{"name": "Proxy-Authorization", "value": "Basic eA=="}]},
                 "headers[0].name: credentials never belong in a spec", id="proxy-authorization"),
    pytest.param({"headers": [{"name": "Cookie", "value": "session=x"}]},
                 "headers[0].name: credentials never belong in a spec", id="cookie"),
    pytest.param({"headers": [{"name": "Bad Header", "value": "x"}]}, "headers[0].name: String should match",
                 id="header-name-not-a-token"),
    pytest.param({"body": "{}"}, "web.body: only allowed with method POST", id="body-with-default-get"),
    pytest.param({"method": "GET", "body": "{}"}, "web.body: only allowed with method POST", id="body-with-get"),
    pytest.param({"method": "PUT"}, "web.method: Input should be 'GET' or 'POST'", id="other-method"),
    pytest.param({"url": "ftp://x/score"}, "web.url: String should match", id="not-http"),
    pytest.param({"timeoutSeconds": 61}, "web.timeoutSeconds: Input should be less than or equal to 60",
                 id="timeout-too-long"),
    pytest.param({"jsonPath": ""}, "web.jsonPath: String should have at least 1 character", id="empty-json-path"),
])
def test_web_spec_refuses(fragment: dict[str, Any], problem: str) -> None:
    document = {"url": "http://quality:8080/score", "jsonPath": "$.score", **fragment}
    with pytest.raises(schema.ApiError) as raised:
        schema.parse(providers.web.Web, document, prefix="spec.rollout.analysis.metrics[0].web")
    assert any(p.startswith("spec.rollout.analysis.metrics[0].") and problem in p for p in raised.value.problems), (
        raised.value.problems)


@pytest.mark.parametrize("fragment", [
    pytest.param({}, id="defaults"),
    pytest.param({"method": "POST", "body": '{"v": "{{version}}"}'}, id="post-body"),
    pytest.param({"headers": [{"name": "Accept", "value": "application/json"},
                              {"name": "X-Authorization-Mode", "value": "none"}]}, id="other-headers"),
])
def test_web_spec_accepts(fragment: dict[str, Any]) -> None:
    parsed = schema.parse(providers.web.Web, {"url": "http://quality:8080/score", "jsonPath": "$.score", **fragment})
    assert parsed.method == fragment.get("method", "GET") and parsed.timeout_seconds == 10
