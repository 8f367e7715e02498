"""A minimal HTTP/1.1 server connection on asyncio + httptools (the server's socket I/O).

Per-request framework cost is what dominates a small model, so this is a bare asyncio `Protocol`: httptools
parses, the application gets a `Request` and answers it with `Connection.respond`, possibly later (after the
batch it joined has run). Responses go out in request order (pipelining-safe), keep-alive follows the client,
bodies over the limit get a 413 before they are read, oversized headers a 431, garbage a 400.

The application object passed in implements `handle(conn, request)` and `observe_rejected(request,
status)`. Connection housekeeping is this layer's too (`Connections`, one per server): connections idle longer
than the keep-alive timeout are closed, a request the client stopped sending half-way gets a 408, and on drain
every connection closes once it has answered what it received.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import httptools

from shipyard.runtime import oip

log = logging.getLogger("shipyard.runtime.httpproto")

MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 64  # stop reading a connection with this many requests waiting for their answers
DISCARD_LINGER_S = 2.0  # after a 413, keep draining the client's body for at most this long, then close
JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"

REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def build_response_head(status: int, length: int, content_type: bytes, close: bool, extra: bytes = b"") -> bytes:
    """The status line and headers of a response (pure)."""
    reason = REASONS.get(status, b"Unknown")
    connection = b"connection: close\r\n" if close else b""
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s%s\r\n" % (
        status,
        reason,
        content_type,
        length,
        connection,
        extra,
    )


class Application(Protocol):
    def handle(self, conn: Connection, request: Request) -> None: ...

    def observe_rejected(self, request: Request, status: int) -> None: ...


class _Abort(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Request:
    """One parsed request; also its slot in the connection's response order."""

    __slots__ = (
        "method", "url", "body", "started", "keep_alive", "response", "close_after", "context", "inference_header"
    )

    def __init__(self, started: float) -> None:
        self.method = ""
        self.url = b""
        self.body = b""
        self.started = started
        self.keep_alive = True
        self.response: bytes | None = None
        self.close_after = False
        self.context: Any = None  # the application's per-request state
        # the raw Inference-Header-Content-Length value (the binary tensor data extension); None when absent
        self.inference_header: bytes | None = None

    @property
    def path(self) -> bytes:
        url = self.url
        index = url.find(b"?")
        return url if index < 0 else url[:index]


class Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, app: Application, connections: Connections, max_body_bytes: int) -> None:
        self.app = app
        self.connections = connections
        self.max_body_bytes = max_body_bytes
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._pending: deque[Request] = deque()
        self._current: Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._header_bytes = 0
        self._expect_continue = False
        self._discarding = False
        self._paused = False
        self.last_active = time.monotonic()  # last bytes received or response written (idle timeout)

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._pending.clear()
        self.connections.open.discard(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self._discarding:
            # After a 413 the parser is dead (the error it raised stays raised): feeding it again would raise once
            # more, without the cause. Drop the rest of the body until the linger timer closes.
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrades are not supported")
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, _Abort):
                self._reject(cause.status, str(cause))
            else:  # a bug in a handler: answer 500 and close rather than drop the connection silently
                log.error("Failed to handle a request: %r", cause, exc_info=cause)
                self._reject(500, "internal server error")
        except httptools.HttpParserError as error:
            if not self._discarding:
                self._reject(400, f"malformed HTTP request: {error}")

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._current = Request(time.perf_counter())
        self._body = []
        self._body_size = 0
        self._header_bytes = 0
        self._expect_continue = False

    def on_url(self, url: bytes) -> None:
        request = self._current
        assert request is not None
        request.url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Abort(431, "the request line and headers are too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Abort(431, "the request line and headers are too large")
        lowered = name.lower()
        if lowered == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return  # httptools rejects it
            if length > self.max_body_bytes:
                raise _Abort(413, f"the request body ({length} bytes) exceeds the limit of {self.max_body_bytes} bytes")
        elif lowered == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True
        elif lowered == b"inference-header-content-length":
            request = self._current
            assert request is not None
            request.inference_header = value

    def on_headers_complete(self) -> None:
        request = self._current
        assert request is not None
        request.method = self._parser.get_method().decode("ascii", "replace")
        request.keep_alive = self._parser.should_keep_alive()
        if self._expect_continue and not self._pending and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._discarding:
            return
        self._body_size += len(body)
        if self._body_size > self.max_body_bytes:
            raise _Abort(413, f"the request body exceeds the limit of {self.max_body_bytes} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._discarding:
            self._close()
            return
        request = self._current
        assert request is not None
        self._current = None
        body = self._body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._pending.append(request)
        if len(self._pending) >= MAX_PIPELINED and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self.app.handle(self, request)

    # -- responses
    def respond(
        self, request: Request, status: int, body: bytes, content_type: bytes = JSON, extra: bytes = b""
    ) -> None:
        """Answer a request (now or later); responses are written in request order."""
        if self.transport is None:
            return
        pending = self._pending
        close = not request.keep_alive or (self.connections.closing and pending and pending[-1] is request)
        request.close_after = bool(close)
        head = build_response_head(status, len(body), content_type, bool(close), extra)
        # A response to HEAD has no body (RFC 9110 9.3.2): sent anyway, it would be read as the next response.
        request.response = head if request.method == "HEAD" else head + body
        if pending and pending[0] is request:
            self._flush()

    def _flush(self) -> None:
        pending = self._pending
        transport = self.transport
        self.last_active = time.monotonic()
        while pending and pending[0].response is not None and transport is not None:
            request = pending.popleft()
            transport.write(request.response)  # type: ignore[arg-type]
            if request.close_after:
                if not self._discarding:  # after a 413 the linger timer (or the body's end) closes
                    self._close()
                pending.clear()
                return
        if self._paused and len(pending) < MAX_PIPELINED // 2 and transport is not None:
            self._paused = False
            transport.resume_reading()
        if self.connections.closing and not pending and self._current is None:
            self._close()

    def _reject(self, status: int, message: str) -> None:
        """Answer a request that cannot even be parsed/read, then close the connection."""
        request = self._current or Request(time.perf_counter())
        self._current = None
        if not request.method:
            try:
                request.method = self._parser.get_method().decode("ascii", "replace")
            except httptools.HttpParserError:
                request.method = "OTHER"
        request.keep_alive = False
        self._pending.append(request)
        self.app.observe_rejected(request, status)
        if status == 413 and self.transport is not None and not self.transport.is_closing():
            # Read and drop the rest of the body so the client sees the 413 rather than a reset.
            self._discarding = True
            asyncio.get_running_loop().call_later(DISCARD_LINGER_S, self._close)
        self.respond(request, status, oip.build_error_body(message))

    @property
    def idle(self) -> bool:
        return not self._pending and self._current is None

    @property
    def stalled(self) -> bool:
        """Part of a request has arrived and the rest is awaited (nothing is waiting to be answered)."""
        return not self._pending and self._current is not None and not self._discarding

    def reject_stalled(self) -> None:
        """Answer a request the client stopped sending half-way with 408, and close (slow or stuck clients must not
        hold connections forever)."""
        if self.stalled:
            self._reject(408, "the request was not received in time")

    def close_if_idle(self) -> None:
        if self.idle:
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Connections:
    """A server's open connections and their housekeeping; everything runs on the event loop.

    `start` begins the idle sweep: a connection with nothing received or written for the keep-alive timeout is
    closed when idle, and answered 408 and closed when it holds half a request (slow or stuck clients must not hold
    connections forever). On drain, `begin_close` makes each connection close once it has answered what it received
    (`connection: close` on its last response), `wait_closed` waits for that, and `close_all` ends the rest.
    """

    def __init__(self, keep_alive_timeout_s: float) -> None:
        self.keep_alive_timeout_s = keep_alive_timeout_s
        self.open: set[Connection] = set()
        self.closing = False  # draining: connections close once answered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._sweep_interval = min(1.0, self.keep_alive_timeout_s / 4)
        self._sweeper = loop.call_later(self._sweep_interval, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._loop = None

    def _sweep(self) -> None:
        self.sweep_idle(time.monotonic())
        if self._loop is not None:
            self._sweeper = self._loop.call_later(self._sweep_interval, self._sweep)

    def sweep_idle(self, now: float) -> None:
        """Close the connections quiet for the keep-alive timeout (`now` is `time.monotonic()`); 408 to stalled ones."""
        idle_before = now - self.keep_alive_timeout_s
        for conn in [c for c in self.open if c.last_active < idle_before]:
            if conn.idle:
                conn.close_if_idle()
            elif conn.stalled:  # half a request, then nothing for as long: 408 and close
                conn.reject_stalled()

    @property
    def busy(self) -> int:
        """Connections with a request in progress (being received, or waiting for its answer)."""
        return sum(0 if conn.idle else 1 for conn in self.open)

    @property
    def idle(self) -> bool:
        return all(conn.idle for conn in self.open)

    def close_idle(self) -> None:
        for conn in list(self.open):
            conn.close_if_idle()

    def begin_close(self) -> None:
        """Drain (the listening socket is closed): idle connections close now, the others once they have answered."""
        self.closing = True
        self.close_idle()

    async def wait_closed(self, deadline: float, busy: Callable[[], bool]) -> None:
        """Until `deadline` (`time.monotonic()`): once `busy()` (the application still owes answers) turns false,
        close the connections as they turn idle, and return when all are."""
        while time.monotonic() < deadline:
            if not busy():
                self.close_idle()
                if self.idle:
                    return
            await asyncio.sleep(0.01)

    def close_all(self) -> None:
        """End of the drain: close every connection, whatever it still holds."""
        for conn in list(self.open):
            conn._close()
