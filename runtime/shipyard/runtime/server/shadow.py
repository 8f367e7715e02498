"""Shadow traffic, the I/O part: the stable's server copies answered inference requests to the candidate.

Does I/O (HTTP/1.1 client connections to the candidate, on the server's event loop). `Shadow.offer` (REST) and
`Shadow.offer_parsed` (gRPC, sent to the candidate's REST endpoint as JSON) are called
after the stable's answer was handed to the client's connection: it never awaits, never raises and costs a counter
and, for a sampled request, one task. The task sends the request body to the candidate's same inference path
over a pooled keep-alive connection, waits at most the timeout, and compares the two answers
(`shadowplan.compare_answers`). Bounded: at most `max_inflight` copies holding at most `max_inflight_bytes` in
flight, more are dropped and counted;
a copy past its timeout is abandoned (its connection closed) and counted. Every outcome is a counter in the
server's metrics (`metrics.ShadowMetrics`); nothing here can fail the client's request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import numpy as np

from shipyard.runtime import metrics, oip, shadowplan

log = logging.getLogger("shipyard.runtime.server")

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_IDLE_CONNECTIONS = 16
LOG_INTERVAL_S = 60.0  # at most one warning per outcome kind this often


class _ProtocolError(Exception):
    """The candidate's HTTP answer could not be read."""


class _Stale(Exception):
    """A pooled connection the candidate had closed (nothing was read): retried once on a new connection."""


class Shadow:
    """Copies sampled inference requests to the candidate and counts how its answers compare."""

    def __init__(self, config: shadowplan.ShadowConfig, model: str, shadow_metrics: metrics.ShadowMetrics) -> None:
        self.config = config
        self.metrics = shadow_metrics
        self.path = shadowplan.build_infer_path(config.base_path, model)
        self._host_header = f"host: {config.host}:{config.port}\r\n".encode()
        self._answered = 0  # answered (200) requests seen, for plan_sample
        self._inflight = 0
        self._held = 0  # bytes of bodies and answers held by copies in flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._logged: dict[str, float] = {}
        self._stopped = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        log.info("Shadowed %g%% of answered inference requests to %s (candidate %s), compared by %s (tolerance %g), "
                 "at most %d in flight, timeout %g s", self.config.percent, self.config.display,
                 self.config.candidate, self.config.compare, self.config.tolerance, self.config.max_inflight,
                 self.config.timeout_s)

    def stop(self) -> None:
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    def offer(self, body: bytes, inference_header: bytes | None, answer: bytes, header_length: int | None) -> None:
        """The stable answered a request with 200 (`answer`, with `header_length` for a binary answer): copy the
        request to the candidate when sampled. Never awaits, never raises."""
        size = len(body) + len(answer)
        if self._admit(size):
            self._launch(self._shadow(body, inference_header, answer, header_length), size)

    def offer_parsed(self, request: oip.InferRequest, inputs: Sequence[oip.TensorSpecLike],
                     outputs: Sequence[oip.TensorSpecLike], result: Sequence[np.ndarray], model: str,
                     version: str) -> None:
        """The stable answered a request of another front end (gRPC) with `result`: copy it, when sampled, to the
        candidate's REST endpoint as JSON built from its tensors (built in the task, off the answering path)."""
        size = 2 * sum(int(array.nbytes) for array in request.arrays) + sum(int(array.nbytes) for array in result)
        if self._admit(size):  # the copy's JSON is larger than its tensors' bytes: a rough share of the bound
            self._launch(self._shadow_parsed(request, inputs, outputs, result, model, version), size)

    def _admit(self, size: int) -> bool:
        """Count an answered request; whether a copy of it goes out now (sampled, under the in-flight bounds on
        copies and on the bytes they hold)."""
        if self._loop is None or self._stopped:
            return False
        self._answered += 1
        if not shadowplan.plan_sample(self._answered, self.config.percent):
            return False
        if self._inflight >= self.config.max_inflight or self._held + size > self.config.max_inflight_bytes:
            self.metrics.observe_outcome("dropped")
            return False
        return True

    def _launch(self, work: Coroutine[Any, Any, None], size: int) -> None:
        assert self._loop is not None
        self._inflight += 1
        self._held += size
        self.metrics.inflight.inc()
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._done(done, size))

    async def _shadow_parsed(self, request: oip.InferRequest, inputs: Sequence[oip.TensorSpecLike],
                             outputs: Sequence[oip.TensorSpecLike], result: Sequence[np.ndarray], model: str,
                             version: str) -> None:
        try:
            body = shadowplan.build_request_body(inputs, request.arrays, outputs, request.output_indices)
            answer = oip.build_infer_response(model, version, None, outputs, result, request.output_indices)
        except Exception as error:  # e.g. a tensor orjson cannot encode: counted, never the client's problem
            self.metrics.observe_outcome("error")
            self._warn("error", f"could not encode the copy: {type(error).__name__}: {error}")
            return
        await self._shadow(body, None, answer, None)

    def _done(self, task: asyncio.Task[None], size: int) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        self._held -= size
        self.metrics.inflight.dec()

    def _warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        last = self._logged.get(kind)
        if last is None or now - last >= LOG_INTERVAL_S:
            self._logged[kind] = now
            log.warning("Shadow copy to %s: %s (outcome %s; logged at most once a minute)", self.config.display,
                        message, kind)

    async def _shadow(self, body: bytes, inference_header: bytes | None, answer: bytes,
                      header_length: int | None) -> None:
        try:
            async with asyncio.timeout(self.config.timeout_s):
                status, candidate_header, candidate_body = await self._post(body, inference_header)
        except TimeoutError:
            self.metrics.observe_outcome("timeout")
            self._warn("timeout", f"no answer within {self.config.timeout_s:g} s")
            return
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _ProtocolError, _Stale) as error:
            self.metrics.observe_outcome("error")
            self._warn("error", f"{type(error).__name__}: {error}")
            return
        except Exception as error:  # a bug: counted, never the client's problem
            self.metrics.observe_outcome("error")
            log.exception("Failed to send a shadow copy")
            self._warn("error", f"{type(error).__name__}: {error}")
            return
        try:
            stable = shadowplan.parse_infer_response(answer, header_length)
            candidate = shadowplan.assess_candidate_answer(status, candidate_body, candidate_header)
            comparison = shadowplan.compare_answers(stable, candidate, self.config.compare, self.config.tolerance)
        except shadowplan.AnswerError as error:
            self.metrics.observe_outcome("error")
            self._warn("error", str(error))
            return
        except Exception as error:  # a bug: counted, never the client's problem
            self.metrics.observe_outcome("error")
            log.exception("Failed to compare a shadow answer")
            self._warn("error", f"{type(error).__name__}: {error}")
            return
        self.metrics.observe_comparison(comparison.rows, comparison.agreeing, comparison.scores)

    async def _post(self, body: bytes, inference_header: bytes | None) -> tuple[int, int | None, bytes]:
        """POST the body to the candidate: (status, inference header length or None, body)."""
        if inference_header is not None:
            extra = b"content-type: application/octet-stream\r\ninference-header-content-length: %s\r\n" % (
                inference_header)
        else:
            extra = b"content-type: application/json\r\n"
        head = (b"POST %s HTTP/1.1\r\n%s%scontent-length: %d\r\n\r\n"
                % (self.path.encode(), self._host_header, extra, len(body)))
        while self._idle:
            reader, writer = self._idle.pop()
            if reader.at_eof() or writer.is_closing():
                writer.close()
                continue
            try:
                return await self._exchange(reader, writer, head, body, reused=True)
            except _Stale:
                break  # the candidate closed it while idle: once more on a new connection
        reader, writer = await asyncio.open_connection(self.config.host, self.config.port)
        return await self._exchange(reader, writer, head, body, reused=False)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes,
                        reused: bool) -> tuple[int, int | None, bytes]:
        keep = False
        try:
            writer.write(head + body)
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionResetError) as error:
                if reused and (not isinstance(error, asyncio.IncompleteReadError) or not error.partial):
                    raise _Stale(str(error)) from None
                raise
            status, length, header_length, close = parse_response_head(raw)
            if length > MAX_RESPONSE_BYTES:
                raise _ProtocolError(f"an answer of {length} bytes (more than {MAX_RESPONSE_BYTES})")
            answer = await reader.readexactly(length)
            keep = not close
            return status, header_length, answer
        finally:
            if keep and not self._stopped and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append((reader, writer))
            else:
                writer.close()


def parse_response_head(raw: bytes) -> tuple[int, int, int | None, bool]:
    """An HTTP/1.1 response head: (status, content length, inference header length or None, connection close).
    Pure; raises _ProtocolError for anything this client does not read (no content-length, chunked)."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = int(parts[1])
    length: int | None = None
    header_length: int | None = None
    close = parts[0] == "HTTP/1.0"
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name, value = name.strip().lower(), value.strip()
        if name == "content-length" and value.isdigit():
            length = int(value)
        elif name == "inference-header-content-length" and value.isdigit():
            header_length = int(value)
        elif name == "connection":
            close = value.lower() == "close"
        elif name == "transfer-encoding":
            raise _ProtocolError(f"transfer-encoding {value} is not read")
    if length is None:
        raise _ProtocolError("an answer without content-length")
    return status, length, header_length, close
