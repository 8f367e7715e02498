"""The activator (``shipyard.operator.activator``): its pure decisions, table-driven, then the real activator on
127.0.0.1 in front of a real aiohttp upstream that is down, answers as an activator would (the Service still points
at activators), or answers as a model pod. Held requests, forwarding, streaming, deadlines, loop protection, limits,
bounces back to waiting and upstream failures go through sockets; no mocks. One test runs the program itself
(``python -m``) for its environment variables, logs and SIGTERM drain."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from shipyard import contract
from shipyard.operator import activator as act

READY = "/v2/health/ready"
HOP = contract.ACTIVATOR_HOP_HEADER
MARK = contract.ACTIVATOR_HEADER
POD = "digits-activator-0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async def check() -> bool:
        return predicate()
    await eventually(check, timeout)


# --- pure decisions -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sent", "forwarded"), [
    pytest.param([("Content-Type", "application/json"), ("Authorization", "Bearer t")],
                 [("Content-Type", "application/json"), ("Authorization", "Bearer t"), (HOP, POD)], id="end-to-end"),
    pytest.param([("Host", "digits"), ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
                  ("Trailer", "X-T"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("X-A", "1")],
                 [("X-A", "1"), (HOP, POD)], id="hop-by-hop"),
    pytest.param([("Proxy-Authorization", "Basic x"), ("Proxy-Connection", "keep-alive"), ("X-A", "1")],
                 [("X-A", "1"), (HOP, POD)], id="proxy-star"),
    pytest.param([("Connection", "close, X-Private , x-other"), ("X-Private", "p"), ("X-Other", "o"), ("X-A", "1")],
                 [("X-A", "1"), (HOP, POD)], id="named-by-connection"),
    pytest.param([("Content-Length", "12"), ("Expect", "100-continue"), ("X-A", "1")], [("X-A", "1"), (HOP, POD)],
                 id="length-and-expect-are-aiohttp's"),
    pytest.param([("Accept", "a"), ("accept", "b"), ("Cookie", "c=1")], [("Accept", "a"), ("accept", "b"),
                                                                         ("Cookie", "c=1"), (HOP, POD)],
                 id="repeated-kept-in-order"),
    pytest.param([(HOP, "someone-else")], [(HOP, POD)], id="own-hop-header-replaces"),
])
def test_forward_request_headers(sent: list[tuple[str, str]], forwarded: list[tuple[str, str]]) -> None:
    assert list(act.forward_request_headers(CIMultiDict(sent), POD).items()) == forwarded


@pytest.mark.parametrize(("answered", "relayed"), [
    pytest.param([("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked"), ("Connection", "keep-alive"),
                  ("Keep-Alive", "timeout=5")], [("Content-Type", "text/event-stream")], id="chunked-reframed"),
    pytest.param([("Content-Length", "42"), ("Content-Encoding", "gzip"), ("ETag", "x")],
                 [("Content-Length", "42"), ("Content-Encoding", "gzip"), ("ETag", "x")], id="length-encoding-kept"),
    pytest.param([("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")],
                 id="repeated-kept"),
    pytest.param([("Connection", "X-Hop"), ("X-Hop", "1"), ("Proxy-Authenticate", "Basic"), ("Upgrade", "h2c"),
                  ("Trailer", "X-T"), ("X-End", "2")], [("X-End", "2")], id="hop-by-hop"),
])
def test_forward_response_headers(answered: list[tuple[str, str]], relayed: list[tuple[str, str]]) -> None:
    assert list(act.forward_response_headers(CIMultiDict(answered)).items()) == relayed


@pytest.mark.parametrize(("status", "headers", "switched"), [
    pytest.param(200, {}, True, id="model-ready"),
    pytest.param(200, {"Content-Type": "application/json"}, True, id="model-ready-json"),
    pytest.param(200, {MARK: "a-0"}, False, id="activator-200"),
    pytest.param(200, {"X-Shipyard-Activator": "a-0"}, False, id="activator-header-any-case"),
    pytest.param(503, {MARK: "a-0"}, False, id="activator-loop-503"),
    pytest.param(503, {}, False, id="model-not-ready"),
    pytest.param(404, {}, False, id="no-ready-path"),
    pytest.param(204, {}, False, id="not-200"),
])
def test_upstream_switched(status: int, headers: dict[str, str], switched: bool) -> None:
    assert act.upstream_switched(status, CIMultiDict(headers)) is switched
    assert act.reached_activator(CIMultiDict(headers)) is (MARK in CIMultiDict(headers))


@pytest.mark.parametrize(("upstream", "raw_path", "url"), [
    ("http://digits.ml.svc:8080", "/v2/models/digits/infer", "http://digits.ml.svc:8080/v2/models/digits/infer"),
    ("http://digits.ml.svc:8080", "/a%2Fb?x=%20&y=1&y=2", "http://digits.ml.svc:8080/a%2Fb?x=%20&y=1&y=2"),
    ("http://gw/prefix/", "/v1/chat/completions", "http://gw/prefix/v1/chat/completions"),
    ("http://digits:8080", "http://elsewhere:1/p?q=1", "http://digits:8080/p?q=1"),
    ("http://digits:8080", "/", "http://digits:8080/"),
])
def test_upstream_url(upstream: str, raw_path: str, url: str) -> None:
    assert act.upstream_url(upstream, raw_path) == url


@pytest.mark.parametrize(("seconds", "text"), [(120.0004, "120"), (0.31, "0.3"), (2.5, "2.5"), (1234.5, "1234.5"),
                                               (0.0, "0")])
def test_seconds_text(seconds: float, text: str) -> None:
    assert act.seconds_text(seconds) == text


def test_messages() -> None:
    assert act.error_body("x \"y\"") == b'{"error": "x \\"y\\""}'
    assert act.timeout_message("digits", 120.001) == (
        "model digits has no ready pod after 120 s (scaled to zero; the activator held the request)")
    assert "is stopping" in act.timeout_message("digits", 3, stopping=True)
    assert "digits" in act.full_message("digits", 1000) and "1000" in act.full_message("digits", 1000)
    assert HOP in act.loop_message("digits") and "digits" in act.loop_message("digits")
    assert "64" in act.too_large_message(64)


REQUIRED = ["--upstream", "http://digits.ml.svc:8080", "--model", "digits"]


@pytest.mark.parametrize(("argv", "env", "expected"), [
    pytest.param(REQUIRED, {}, {"upstream": "http://digits.ml.svc:8080", "model": "digits", "port": 8080,
                                "metrics_port": contract.ACTIVATOR_METRICS_PORT, "address": "0.0.0.0",
                                "ready_path": READY, "hold_timeout": 120.0, "max_pending": 1000,
                                "max_body_bytes": 67108864, "probe_interval": 0.25, "drain_timeout": 25.0,
                                "pod_name": "host-1", "log_level": "INFO"}, id="defaults"),
    pytest.param([], {"SHIPYARD_ACTIVATOR_UPSTREAM": "https://d:8443/", "SHIPYARD_ACTIVATOR_MODEL": "m",
                      "SHIPYARD_ACTIVATOR_PORT": "9000", "SHIPYARD_ACTIVATOR_METRICS_PORT": "9001",
                      "SHIPYARD_ACTIVATOR_ADDRESS": "127.0.0.1", "SHIPYARD_ACTIVATOR_READY_PATH": "/ready",
                      "SHIPYARD_ACTIVATOR_HOLD_TIMEOUT": "30", "SHIPYARD_ACTIVATOR_MAX_PENDING": "5",
                      "SHIPYARD_ACTIVATOR_MAX_BODY_BYTES": "1024", "SHIPYARD_ACTIVATOR_PROBE_INTERVAL": "0.5",
                      "SHIPYARD_ACTIVATOR_DRAIN_TIMEOUT": "10", "SHIPYARD_ACTIVATOR_POD_NAME": "a-1",
                      "SHIPYARD_ACTIVATOR_LOG_LEVEL": "debug"},
                 {"upstream": "https://d:8443", "model": "m", "port": 9000, "metrics_port": 9001,
                  "address": "127.0.0.1", "ready_path": "/ready", "hold_timeout": 30.0, "max_pending": 5,
                  "max_body_bytes": 1024, "probe_interval": 0.5, "drain_timeout": 10.0, "pod_name": "a-1",
                  "log_level": "DEBUG"}, id="all-from-env"),
    pytest.param([*REQUIRED, "--hold-timeout", "5", "--pod-name", "flag"],
                 {"SHIPYARD_ACTIVATOR_HOLD_TIMEOUT": "30", "SHIPYARD_ACTIVATOR_POD_NAME": "env", "POD_NAME": "p"},
                 {"hold_timeout": 5.0, "pod_name": "flag"}, id="flag-wins-over-env"),
    pytest.param(REQUIRED, {"POD_NAME": "digits-activator-7f9-x2"}, {"pod_name": "digits-activator-7f9-x2"},
                 id="pod-name-from-downward-api"),
    pytest.param(["--model", "m"], {"SHIPYARD_ACTIVATOR_UPSTREAM": "http://u"}, {"upstream": "http://u"},
                 id="required-from-env"),
])
def test_parse_args(argv: list[str], env: dict[str, str], expected: dict[str, Any]) -> None:
    settings = act.parse_args(argv, env, "host-1")
    assert {k: getattr(settings, k) for k in expected} == expected


@pytest.mark.parametrize(("argv", "env"), [
    pytest.param(["--model", "m"], {}, id="no-upstream"),
    pytest.param(["--upstream", "http://u"], {}, id="no-model"),
    pytest.param(["--upstream", "ftp://u", "--model", "m"], {}, id="not-http"),
    pytest.param(["--upstream", "http://u/?x=1", "--model", "m"], {}, id="query"),
    pytest.param(["--upstream", "digits:8080", "--model", "m"], {}, id="no-scheme"),
    pytest.param([*REQUIRED, "--hold-timeout", "0"], {}, id="zero-timeout"),
    pytest.param([*REQUIRED, "--probe-interval", "nan"], {}, id="nan-interval"),
    pytest.param([*REQUIRED, "--max-pending", "-1"], {}, id="negative-pending"),
    pytest.param([*REQUIRED, "--port", "70000"], {}, id="port-range"),
    pytest.param([*REQUIRED, "--ready-path", "ready"], {}, id="relative-path"),
    pytest.param([*REQUIRED, "--log-level", "LOUD"], {}, id="log-level"),
    pytest.param(REQUIRED, {"SHIPYARD_ACTIVATOR_MAX_BODY_BYTES": "lots"}, id="bad-env-checked-too"),
])
def test_parse_args_rejects(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        act.parse_args(argv, env, "h")
    assert exit_info.value.code == 2
    assert "shipyard-activator: error" in capsys.readouterr().err


def test_env_names() -> None:
    assert act.env_name("--hold-timeout") == "SHIPYARD_ACTIVATOR_HOLD_TIMEOUT"
    assert act.env_name("--max-body-bytes") == "SHIPYARD_ACTIVATOR_MAX_BODY_BYTES"


# --- the real activator in front of a real upstream -----------------------------------------------------------------

@dataclass
class Seen:
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Upstream:
    """The model's Service as the activator sees it: down (not started), answering as an activator does
    (``mode="activator"``: every answer carries the activator header, the ready path 200), as a model pod whose ready
    path is already switched but whose other paths still reach an activator (``"ready-only"``), or as a model pod."""

    port: int = field(default_factory=free_port)
    mode: str = "model"
    requests: list[Seen] = field(default_factory=list)
    probes: list[CIMultiDict[str]] = field(default_factory=list)
    stream_done: asyncio.Event = field(default_factory=asyncio.Event)
    stream_aborted: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == READY:
            self.probes.append(CIMultiDict(request.headers))
            if self.mode == "activator":
                return web.Response(text="ok", headers={MARK: "other-activator"})
            return web.Response(text="ready")
        body = await request.read()
        self.requests.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body))
        if self.mode != "model":
            return web.Response(status=503, text='{"error": "loop"}', headers={MARK: "other-activator"})
        if request.path == "/stream":
            return await self.stream(request)
        if request.path.startswith("/broken"):
            return await self.broken(request)
        if request.path == "/gzip":
            return web.Response(body=gzip.compress(b"compressed answer"),
                                headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
        headers = CIMultiDict([("X-Upstream", "model-0"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                               ("Content-Type", "application/x-test")])
        return web.Response(status=201, reason="Made", body=b"answer:" + body, headers=headers)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            for i in range(3):
                if i:
                    await asyncio.sleep(0.2)
                await response.write(f"data: {{\"token\": {i}}}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            self.stream_aborted.set()
            return response
        self.stream_done.set()
        return response

    async def broken(self, request: web.Request) -> web.StreamResponse:
        """Starts an answer (100 bytes announced, or chunked) and closes the connection after 10 bytes."""
        headers = {"Content-Length": "100"} if request.path == "/broken/length" else {}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        await response.write(b"x" * 10)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Harness:
    def __init__(self, upstream: Upstream, client: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.client = client
        self.activators: list[act.Activator] = []

    async def activator(self, **overrides: Any) -> act.Activator:
        settings = act.Settings(**{"upstream": self.upstream.url, "model": "digits", "port": 0, "metrics_port": 0,
                                   "address": "127.0.0.1", "ready_path": READY, "hold_timeout": 5.0,
                                   "probe_interval": 0.02, "drain_timeout": 1.0, "pod_name": POD, **overrides})
        activator = act.Activator(settings)
        await activator.start()
        self.activators.append(activator)
        return activator

    async def samples(self, activator: act.Activator) -> Samples:
        """/metrics, over HTTP, parsed by prometheus_client."""
        async with self.client.get(f"http://127.0.0.1:{activator.metrics_port}/metrics") as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"].startswith("text/plain")
            text = await answer.text()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    async def metric(self, activator: act.Activator, name: str, **labels: str) -> float:
        return (await self.samples(activator))[(name, tuple(sorted({"model": "digits", **labels}.items())))]

    async def pending(self, activator: act.Activator) -> float:
        return await self.metric(activator, contract.METRIC_ACTIVATOR_PENDING)

    async def outcomes(self, activator: act.Activator) -> dict[str, float]:
        samples = await self.samples(activator)
        return {outcome: samples[(contract.METRIC_ACTIVATOR_REQUESTS, (("model", "digits"), ("outcome", outcome)))]
                for outcome in act.OUTCOMES}

    async def wait_pending(self, activator: act.Activator, count: int) -> None:
        async def check() -> bool:
            return await self.pending(activator) == count
        await eventually(check)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    upstream = Upstream()
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        h = Harness(upstream, client)
        try:
            yield h
        finally:
            for activator in h.activators:
                await activator.stop()
            await upstream.stop()


def url(activator: act.Activator, path: str) -> str:
    return f"http://127.0.0.1:{activator.port}{path}"


def expected(**nonzero: int) -> dict[str, float]:
    """The request counter's value for each outcome: those named, else 0."""
    return {outcome: float(nonzero.get(outcome, 0)) for outcome in act.OUTCOMES}


async def test_held_while_nothing_listens_then_forwarded(harness: Harness) -> None:
    activator = await harness.activator()
    call = asyncio.create_task(harness.client.post(url(activator, "/v2/models/digits/infer"), data=b"[1,2]"))
    await harness.wait_pending(activator, 1)
    assert await harness.metric(activator, act.METRIC_SWITCHED) == 0
    await asyncio.sleep(0.1)  # several probes are refused meanwhile
    assert not call.done()
    await harness.upstream.start()
    async with await call as answer:
        assert (answer.status, answer.reason) == (201, "Made")
        assert await answer.read() == b"answer:[1,2]"
        assert answer.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert answer.headers["X-Upstream"] == "model-0"
        assert answer.headers["Content-Type"] == "application/x-test"
        assert answer.headers["Content-Length"] == str(len(b"answer:[1,2]"))
        assert MARK not in answer.headers  # the model's answer, not the activator's
    assert await harness.pending(activator) == 0
    assert await harness.metric(activator, act.METRIC_SWITCHED) == 1
    assert await harness.outcomes(activator) == expected(forwarded=1)
    assert await harness.metric(activator, contract.METRIC_ACTIVATOR_HOLD + "_count") == 1
    assert await harness.metric(activator, contract.METRIC_ACTIVATOR_HOLD + "_sum") >= 0.1
    assert [p[HOP] for p in harness.upstream.probes] == [POD]  # one probe once up: it saw the model


async def test_held_while_service_reaches_activators_then_forwarded(harness: Harness) -> None:
    harness.upstream.mode = "activator"  # the ready path answers 200, from an activator
    await harness.upstream.start()
    activator = await harness.activator()
    call = asyncio.create_task(harness.client.get(url(activator, "/v2/models/digits")))
    await harness.wait_pending(activator, 1)
    await until(lambda: len(harness.upstream.probes) >= 3)
    assert not call.done() and not harness.upstream.requests  # nothing forwarded while probes reach activators
    assert all(p[HOP] == POD for p in harness.upstream.probes)
    harness.upstream.mode = "model"
    async with await call as answer:
        assert answer.status == 201 and await answer.read() == b"answer:"
    assert await harness.pending(activator) == 0
    assert await harness.outcomes(activator) == expected(forwarded=1)


async def test_request_reaches_upstream_unchanged(harness: Harness) -> None:
    await harness.upstream.start()
    activator = await harness.activator()

    async def chunked_body() -> AsyncIterator[bytes]:
        yield b'{"inputs": '
        yield b"[0.5, 1e-3]}"

    path = "/v2/models/a%2Fb/infer?x=%20&y=1&y=2&z="
    headers = CIMultiDict([("Content-Type", "application/json"), ("Authorization", "Bearer token"),
                           ("X-Request-Id", "r-1"), ("X-Multi", "1"), ("X-Multi", "2"),
                           ("Connection", "keep-alive, X-Private"), ("X-Private", "hop"), ("Keep-Alive", "timeout=9"),
                           ("TE", "trailers"), ("Proxy-Authorization", "Basic eA=="), ("Trailer", "X-T")])
    async with aiohttp.ClientSession(skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent")) as client:
        target = yarl.URL(url(activator, path), encoded=True)
        async with client.post(target, data=chunked_body(), headers=headers) as answer:
            assert answer.status == 201
            assert await answer.read() == b'answer:{"inputs": [0.5, 1e-3]}'
        async with client.head(url(activator, "/v2/models/digits")) as answer:  # a HEAD answer keeps its length
            assert answer.status == 201 and answer.headers["Content-Length"] == str(len(b"answer:"))
            assert await answer.read() == b""
    post, head = harness.upstream.requests
    assert (post.method, post.raw_path, post.body) == ("POST", path, b'{"inputs": [0.5, 1e-3]}')
    assert sorted((k.lower(), v) for k, v in post.headers.items()) == sorted((k.lower(), v) for k, v in [
        ("Content-Type", "application/json"), ("Authorization", "Bearer token"), ("X-Request-Id", "r-1"),
        ("X-Multi", "1"), ("X-Multi", "2"), (HOP, POD),
        # set by aiohttp from the URL and the body (the client's body came chunked)
        ("Host", f"127.0.0.1:{harness.upstream.port}"), ("Content-Length", "23")])
    assert head.method == "HEAD" and head.body == b"" and head.headers[HOP] == POD
    assert "Content-Type" not in head.headers and "Accept-Encoding" not in head.headers  # none invented


async def test_encoded_answer_relayed_as_is(harness: Harness) -> None:
    await harness.upstream.start()
    activator = await harness.activator()
    async with harness.client.get(url(activator, "/gzip"), headers={"Accept-Encoding": "gzip"}) as answer:
        assert answer.headers["Content-Encoding"] == "gzip"
        body = await answer.read()
        assert answer.headers["Content-Length"] == str(len(body))
        assert gzip.decompress(body) == b"compressed answer"
    assert harness.upstream.requests[0].headers["Accept-Encoding"] == "gzip"


async def test_answer_streams_chunk_by_chunk(harness: Harness) -> None:
    await harness.upstream.start()
    activator = await harness.activator()
    async with harness.client.get(url(activator, "/stream")) as answer:
        assert answer.headers["Content-Type"] == "text/event-stream"
        first = await answer.content.readline()
        assert first == b'data: {"token": 0}\n'
        assert not harness.upstream.stream_done.is_set()  # the upstream is still answering
        started = time.monotonic()
        rest = await answer.read()
        assert time.monotonic() - started >= 0.3
    assert rest == b'\ndata: {"token": 1}\n\ndata: {"token": 2}\n\ndata: [DONE]\n\n'
    assert await harness.outcomes(activator) == expected(forwarded=1)


async def test_client_gone_mid_stream(harness: Harness) -> None:
    await harness.upstream.start()
    activator = await harness.activator()
    async with aiohttp.ClientSession() as client, client.get(url(activator, "/stream")) as answer:
        assert await answer.content.readline() == b'data: {"token": 0}\n'

    async def cancelled() -> bool:
        return (await harness.outcomes(activator))["cancelled"] == 1
    await eventually(cancelled)
    assert await harness.outcomes(activator) == expected(cancelled=1)
    await asyncio.wait_for(harness.upstream.stream_aborted.wait(), 2)  # the activator let go of the model's answer
    assert not harness.upstream.stream_done.is_set()


async def test_deadline_answers_503_naming_the_model(harness: Harness) -> None:
    activator = await harness.activator(hold_timeout=0.3)
    started = time.monotonic()
    async with harness.client.post(url(activator, "/v2/models/digits/infer"), data=b"x") as answer:
        assert answer.status == 503
        assert 0.3 <= time.monotonic() - started < 2
        assert answer.headers["Retry-After"] == "1"
        assert answer.headers[MARK] == POD
        assert answer.headers["Content-Type"] == "application/json"
        assert await answer.json() == {"error": "model digits has no ready pod after 0.3 s (scaled to zero; the "
                                                "activator held the request)"}
    assert await harness.pending(activator) == 0
    assert await harness.outcomes(activator) == expected(timeout=1)
    assert await harness.metric(activator, contract.METRIC_ACTIVATOR_HOLD + "_count") == 0


async def test_request_from_an_activator_is_refused_at_once(harness: Harness) -> None:
    activator = await harness.activator()
    started = time.monotonic()
    async with harness.client.get(url(activator, "/v2/models/digits"), headers={HOP: "other"}) as answer:
        assert answer.status == 503 and time.monotonic() - started < 0.5
        assert answer.headers[MARK] == POD and answer.headers.get("Connection") == "close"
        assert "still reaches activators" in (await answer.json())["error"]
    async with harness.client.get(url(activator, READY), headers={HOP: "other"}) as answer:  # another's probe
        assert answer.status == 503 and answer.headers[MARK] == POD
    assert await harness.outcomes(activator) == expected(rejected=2)
    assert not harness.upstream.probes  # not held, so nothing probed


async def test_max_pending_then_client_gone(harness: Harness) -> None:
    activator = await harness.activator(max_pending=2)
    async with aiohttp.ClientSession() as waiting:
        held = [asyncio.create_task(waiting.get(url(activator, f"/{i}"))) for i in range(2)]
        await harness.wait_pending(activator, 2)
        async with harness.client.get(url(activator, "/third")) as answer:
            assert answer.status == 503 and answer.headers["Retry-After"] == "1"
            assert "holds 2 requests" in (await answer.json())["error"]
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    await harness.wait_pending(activator, 0)  # the clients went away: no longer held

    async def cancelled() -> bool:
        return (await harness.outcomes(activator))["cancelled"] == 2
    await eventually(cancelled)
    assert await harness.outcomes(activator) == expected(rejected=1, cancelled=2)


async def test_body_limit(harness: Harness) -> None:
    await harness.upstream.start()
    activator = await harness.activator(max_body_bytes=10)

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 4):
            yield data[i:i + 4]

    async with harness.client.post(url(activator, "/a"), data=b"0123456789") as answer:
        assert answer.status == 201  # exactly the limit
    for body in (b"0123456789A", chunked(b"0123456789A")):
        async with harness.client.post(url(activator, "/a"), data=body) as answer:
            assert answer.status == 413 and answer.headers[MARK] == POD
            assert (await answer.json())["error"].startswith("request body over 10 bytes")
    assert len(harness.upstream.requests) == 1
    assert await harness.outcomes(activator) == expected(forwarded=1, rejected=2)


async def test_forward_reaching_an_activator_goes_back_to_waiting(harness: Harness) -> None:
    harness.upstream.mode = "ready-only"  # the probe sees a model pod, the forwarded request an activator
    await harness.upstream.start()
    activator = await harness.activator()
    call = asyncio.create_task(harness.client.post(url(activator, "/infer"), data=b"once"))
    await until(lambda: len(harness.upstream.requests) >= 2)
    assert not call.done()  # the activator's 503 is not the client's answer
    await harness.wait_pending(activator, 1)  # back to waiting (between two bounces)
    harness.upstream.mode = "model"
    async with await call as answer:
        assert answer.status == 201 and await answer.read() == b"answer:once"
        assert MARK not in answer.headers
    assert all(seen.body == b"once" and seen.headers[HOP] == POD for seen in harness.upstream.requests)
    assert await harness.outcomes(activator) == expected(forwarded=1)
    assert await harness.metric(activator, contract.METRIC_ACTIVATOR_HOLD + "_count") == 1


async def test_refused_forward_after_switch_goes_back_to_waiting(harness: Harness) -> None:
    await harness.upstream.start()
    activator = await harness.activator()
    async with harness.client.get(url(activator, "/first")) as answer:
        assert answer.status == 201
    assert activator.switched
    await harness.upstream.stop()  # the model scaled to zero again: its connections refused
    call = asyncio.create_task(harness.client.post(url(activator, "/second"), data=b"2"))
    await harness.wait_pending(activator, 1)
    assert not activator.switched
    await harness.upstream.start()
    async with await call as answer:
        assert answer.status == 201 and await answer.read() == b"answer:2"
    assert [seen.raw_path for seen in harness.upstream.requests] == ["/first", "/second"]
    assert await harness.outcomes(activator) == expected(forwarded=2)
    # both were held: the first until the first probe (an activator starts not knowing), the second after the refusal
    assert await harness.metric(activator, contract.METRIC_ACTIVATOR_HOLD + "_count") == 2


@pytest.mark.parametrize("path", ["/broken/length", "/broken/chunked"])
async def test_upstream_failing_mid_answer_is_not_retried(harness: Harness, path: str) -> None:
    await harness.upstream.start()
    activator = await harness.activator()
    async with harness.client.post(url(activator, path), data=b"x") as answer:
        assert answer.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await answer.read()
    assert len(harness.upstream.requests) == 1
    assert await harness.outcomes(activator) == expected(upstream_error=1)


async def test_stop_answers_held_requests_before_the_drain_ends(harness: Harness) -> None:
    activator = await harness.activator(hold_timeout=60, drain_timeout=1.5)
    call = asyncio.create_task(harness.client.get(url(activator, "/held")))
    await harness.wait_pending(activator, 1)
    started = time.monotonic()
    await activator.stop()
    assert time.monotonic() - started < 1.5
    harness.activators.remove(activator)
    async with await call as answer:
        assert answer.status == 503 and answer.headers["Retry-After"] == "1"
        assert "is stopping" in (await answer.json())["error"]


# --- the program ----------------------------------------------------------------------------------------------------

async def test_program_from_env_logs_and_drains_on_sigterm(harness: Harness) -> None:
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "SHIPYARD_ACTIVATOR_UPSTREAM": harness.upstream.url, "SHIPYARD_ACTIVATOR_MODEL": "digits",
           "SHIPYARD_ACTIVATOR_PORT": str(port), "SHIPYARD_ACTIVATOR_METRICS_PORT": str(metrics_port),
           "SHIPYARD_ACTIVATOR_ADDRESS": "127.0.0.1", "SHIPYARD_ACTIVATOR_PROBE_INTERVAL": "0.02",
           "POD_NAME": "digits-activator-abc"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shipyard.operator.activator", "--drain-timeout", "2", env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async def healthy() -> bool:
            try:
                async with harness.client.get(f"http://127.0.0.1:{metrics_port}/healthz") as answer:
                    return answer.status == 200
            except aiohttp.ClientConnectionError:
                return False
        await eventually(healthy, timeout=10)
        base = f"http://127.0.0.1:{port}"
        call = asyncio.create_task(harness.client.post(f"{base}/infer", data=b"secret-body",
                                                       headers={"Authorization": "Bearer secret-token"}))

        async def held() -> bool:
            async with harness.client.get(f"http://127.0.0.1:{metrics_port}/metrics") as answer:
                return f'{contract.METRIC_ACTIVATOR_PENDING}{{model="digits"}} 1.0' in await answer.text()
        await eventually(held)
        await harness.upstream.start()
        async with await call as answer:
            assert answer.status == 201 and await answer.read() == b"answer:secret-body"
        assert harness.upstream.requests[0].headers[HOP] == "digits-activator-abc"
        await harness.upstream.stop()
        late = asyncio.create_task(harness.client.get(f"{base}/late"))  # refused: back to waiting
        await eventually(held)
        process.send_signal(signal.SIGTERM)
        async with await late as answer:
            assert answer.status == 503 and answer.headers[MARK] == "digits-activator-abc"
        assert await asyncio.wait_for(process.wait(), 5) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    logs = (await process.stderr.read()).decode()
    assert f"activator digits-activator-abc for model digits: serving on 127.0.0.1:{port}" in logs
    assert "upstream reaches model pods" in logs and "upstream back to activators" in logs
    assert "1 held requests timed out" in logs and "stopped" in logs
    assert "secret" not in logs
