"""An httpx2 transport over aiohttp for the operator's lightkube client (does I/O: HTTP to the API server).

lightkube speaks httpx2, whose default transport (httpcore2) keeps at most 20 idle connections of at most 100: with
128 reconcile workers writing at once, every request beyond those 20 opened a fresh TLS connection (a handshake on
both sides, on the same two cores as the API server) and waited for a pool slot under the 10 s client default, and
its per-request Python work was measured costlier than aiohttp's (bench/README.md, operator_scale). aiohttp is
already the operator's dependency (Kopf's watches use it): this transport hands each request to one aiohttp session
whose connector keeps every connection it opened alive, and maps aiohttp's errors onto httpx2's, so lightkube's
error handling (ApiError, retries of watches) is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
import httpx2

DEFAULT_CONNECTIONS: Final = 256
CHUNK: Final = 64 * 1024
_SET_BY_AIOHTTP: Final = frozenset((b"host", b"content-length", b"transfer-encoding"))  # from the URL and the body


def build_client_timeout(timeout: dict[str, float | None] | None) -> aiohttp.ClientTimeout:
    """aiohttp's timeout from an httpx2 request's ``timeout`` extension (connect, read, write, pool). Pure.

    httpx2's read timeout is per socket read (None for watches); the pool and connect timeouts bound the wait for a
    connection. There is no total: a watch may stream for as long as the server keeps it open."""
    timeout = timeout or {}
    pool, connect = timeout.get("pool"), timeout.get("connect")
    waits = [t for t in (pool, connect) if t is not None]
    return aiohttp.ClientTimeout(total=None, connect=sum(waits) if waits else None, sock_connect=connect,
                                 sock_read=timeout.get("read"))


def map_error(error: BaseException, request: httpx2.Request) -> httpx2.HTTPError:
    """The httpx2 exception lightkube expects for an aiohttp (or asyncio) error. Pure."""
    message = str(error) or type(error).__name__
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return httpx2.ConnectTimeout(message, request=request)
    if isinstance(error, TimeoutError):  # aiohttp's socket read timeout is one too
        return httpx2.ReadTimeout(message, request=request)
    if isinstance(error, aiohttp.ClientConnectorError):
        return httpx2.ConnectError(message, request=request)
    if isinstance(error, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx2.RemoteProtocolError(message, request=request)
    if isinstance(error, OSError):
        return httpx2.ReadError(message, request=request)
    return httpx2.TransportError(message, request=request)


class _ResponseStream(httpx2.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx2.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise map_error(e, self._request) from e

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """One aiohttp session (created in the running loop on first use) for every request of one lightkube client."""

    def __init__(self, ssl_context: ssl.SSLContext | bool, connections: int = DEFAULT_CONNECTIONS) -> None:
        self._ssl = ssl_context
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=self._connections, limit_per_host=0,
                                             keepalive_timeout=60.0)
            # No cookies (the API server sets none) and no automatic decompression or redirects: httpx2 does both.
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                                  auto_decompress=False, skip_auto_headers=("User-Agent",))
        return self._session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        session = self._get_session()
        body = await request.aread()
        timeout: Any = request.extensions.get("timeout")
        try:
            response = await session.request(
                request.method, str(request.url), data=body or None, allow_redirects=False,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                         if k.lower() not in _SET_BY_AIOHTTP],
                timeout=build_client_timeout(timeout),
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise map_error(e, request) from e
        return httpx2.Response(status_code=response.status, headers=list(response.raw_headers),
                               stream=_ResponseStream(response, request),
                               extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            await asyncio.sleep(0)  # aiohttp: let the connector's transports close
            self._session = None
