"""The operator's lightkube client over the aiohttp transport (``httptransport``), against a fake API server on
127.0.0.1 (aiohttp): requests arrive as lightkube built them, answers and API errors come back as lightkube's,
watches stream, timeouts and refused connections raise httpx2's errors, and connections are kept and reused.
No mocks of the HTTP client: every case goes through a socket."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httpx2
import lightkube
import pytest
from aiohttp import web
from lightkube.config.kubeconfig import KubeConfig

from shipyard.operator import httptransport, kube

CM = kube.resource_for("v1", "ConfigMap")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def configmap(name: str, rv: str = "1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "ns",
                                                                  "resourceVersion": rv}, "data": {"a": "b"}}


def answer(obj: dict[str, Any], status: int = 200) -> web.Response:
    """As the API server answers: Content-Type exactly application/json (lightkube tells API errors by it)."""
    return web.Response(body=json.dumps(obj).encode(), status=status, headers={"Content-Type": "application/json"})


class FakeApi:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], str, bytes]] = []
        self.peers: set[Any] = set()
        self.routes: dict[tuple[str, str], Handler] = {}
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.method, request.path, dict(request.query), request.headers.get(
            "Content-Type", ""), body))
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return answer({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                           "reason": "NotFound", "message": f"{request.path} not found"}, status=404)
        return await handler(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def client(self, timeout: float = 5.0) -> lightkube.AsyncClient:
        config = KubeConfig.from_dict({
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "u", "user": {"token": "secret-token"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "ns"}}],
            "current-context": "x"})
        return lightkube.AsyncClient(config=config, field_manager="shipyard", timeout=httpx2.Timeout(timeout),
                                     transport=httptransport.AiohttpTransport(False))


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    server = FakeApi()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


async def test_an_apply_arrives_as_lightkube_built_it_and_its_answer_comes_back(api: FakeApi) -> None:
    async def apply(request: web.Request) -> web.StreamResponse:
        return answer(configmap("c1", rv="7"))

    api.routes["PATCH", "/api/v1/namespaces/ns/configmaps/c1"] = apply
    client = api.client()
    result = await client.apply(CM(configmap("c1")), name="c1", namespace="ns", force=True)
    await client.close()
    assert result.to_dict()["metadata"]["resourceVersion"] == "7"
    method, path, query, content_type, body = api.requests[0]
    assert (method, path, content_type) == ("PATCH", "/api/v1/namespaces/ns/configmaps/c1",
                                            "application/apply-patch+yaml")
    assert query == {"fieldManager": "shipyard", "force": "true"}
    assert json.loads(body)["data"] == {"a": "b"}


async def test_the_bearer_token_is_sent(api: FakeApi) -> None:
    seen: list[str] = []

    async def get(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        return answer(configmap("c1"))

    api.routes["GET", "/api/v1/namespaces/ns/configmaps/c1"] = get
    client = api.client()
    await client.get(CM, "c1", namespace="ns")
    await client.close()
    assert seen == ["Bearer secret-token"]


async def test_an_api_error_is_lightkubes_with_its_status(api: FakeApi) -> None:
    client = api.client()
    with pytest.raises(lightkube.ApiError) as caught:
        await client.get(CM, "missing", namespace="ns")
    await client.close()
    assert caught.value.status.code == 404
    assert "not found" in str(caught.value.status.message)


async def test_a_list_and_a_watch_stream_through(api: FakeApi) -> None:
    async def list_(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") == "true":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for i, kind in enumerate(("ADDED", "MODIFIED")):
                line = json.dumps({"type": kind, "object": configmap(f"w{i}", rv=str(10 + i))}) + "\n"
                await response.write(line.encode())
                await asyncio.sleep(0.01)
            await response.write_eof()
            return response
        return answer({"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"},
                       "items": [configmap("a"), configmap("b")]})

    api.routes["GET", "/api/v1/namespaces/ns/configmaps"] = list_
    client = api.client()
    names = [o.to_dict()["metadata"]["name"] async for o in client.list(CM, namespace="ns")]
    events = []
    async for kind, obj in client.watch(CM, namespace="ns"):
        events.append((kind, obj.to_dict()["metadata"]["name"]))
        if len(events) == 2:
            break
    await client.close()
    assert names == ["a", "b"]
    assert events == [("ADDED", "w0"), ("MODIFIED", "w1")]


async def test_a_slow_answer_is_an_httpx2_read_timeout(api: FakeApi) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2.0)
        return answer(configmap("c1"))

    api.routes["GET", "/api/v1/namespaces/ns/configmaps/c1"] = slow
    client = api.client(timeout=0.2)
    with pytest.raises(httpx2.ReadTimeout):
        await client.get(CM, "c1", namespace="ns")
    await client.close()


async def test_a_closed_port_is_an_httpx2_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = FakeApi()
    server.port = port
    client = server.client()
    with pytest.raises(httpx2.ConnectError):
        await client.get(CM, "c1", namespace="ns")
    await client.close()


async def test_connections_are_kept_and_reused_beyond_twenty(api: FakeApi) -> None:
    """httpx2's default pool keeps 20 idle connections: 64 concurrent writes, twice, would open 108. Here every
    connection of the first burst serves the second."""
    async def get(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.05)
        return answer(configmap("c1"))

    api.routes["GET", "/api/v1/namespaces/ns/configmaps/c1"] = get
    client = api.client()
    for _ in range(2):
        await asyncio.gather(*(client.get(CM, "c1", namespace="ns") for _ in range(64)))
    await client.close()
    assert len(api.requests) == 128
    assert len(api.peers) <= 64


@pytest.mark.parametrize(("timeout", "connect", "sock_read"), [
    pytest.param({"connect": 60.0, "read": 60.0, "write": 60.0, "pool": 60.0}, 120.0, 60.0, id="request"),
    pytest.param({"connect": 60.0, "read": None, "write": 60.0, "pool": 60.0}, 120.0, None, id="watch"),
    pytest.param(None, None, None, id="none"),
])
def test_timeouts_map_per_read_without_a_total(timeout: dict[str, float | None] | None, connect: float | None,
                                              sock_read: float | None) -> None:
    built = httptransport.build_client_timeout(timeout)
    assert (built.total, built.connect, built.sock_read) == (None, connect, sock_read)


@pytest.mark.parametrize(("error", "expected"), [
    pytest.param(aiohttp.ConnectionTimeoutError("connect"), httpx2.ConnectTimeout, id="connect-timeout"),
    pytest.param(aiohttp.SocketTimeoutError("read"), httpx2.ReadTimeout, id="read-timeout"),
    pytest.param(TimeoutError(), httpx2.ReadTimeout, id="asyncio-timeout"),
    pytest.param(aiohttp.ServerDisconnectedError(), httpx2.RemoteProtocolError, id="disconnected"),
    pytest.param(aiohttp.ClientPayloadError("cut"), httpx2.RemoteProtocolError, id="payload"),
    pytest.param(ConnectionResetError(), httpx2.ReadError, id="reset"),
    pytest.param(aiohttp.ClientError("other"), httpx2.TransportError, id="other"),
])
def test_aiohttp_errors_map_to_httpx2s(error: BaseException, expected: type[Exception]) -> None:
    request = httpx2.Request("GET", "http://127.0.0.1/api")
    mapped = httptransport.map_error(error, request)
    assert type(mapped) is expected
    assert isinstance(mapped, httpx2.HTTPError)


def test_the_operator_client_uses_the_aiohttp_transport_and_a_60_s_timeout(tmp_path: Any) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}], "current-context": "x"}))
    ours = kube.Kube.from_env(str(path))
    theirs = kube.Kube.from_env(str(path), transport="httpx")
    inner = ours.client._client._client  # lightkube's GenericAsyncClient -> httpx2.AsyncClient
    assert isinstance(inner._transport, httptransport.AiohttpTransport)
    assert inner.timeout == httpx2.Timeout(kube.REQUEST_TIMEOUT_SECONDS)
    assert not isinstance(theirs.client._client._client._transport, httptransport.AiohttpTransport)
    with pytest.raises(ValueError, match="unknown API transport"):
        kube.Kube.from_env(str(path), transport="requests")
