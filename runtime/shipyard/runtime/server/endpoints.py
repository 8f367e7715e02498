"""The inference server's endpoints: routing a request to one, and the App that answers it.

`plan_route` is pure (path -> route template and kind). `App` holds the serving state of one model (loading,
serving, draining; readiness) and runs on the event loop: it answers health, metadata and metrics requests at
once, submits inference requests to the batcher and answers them when their batch is done, applies fault
injection, answers 504 past the per-request timeout, and counts every request in the metrics. No socket I/O of
its own: it answers through `httpproto.Connection.respond`. Other front ends (`grpcservice`) queue their parsed
requests with `App.submit` and get the results through their job context's `deliver`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

import orjson
import prometheus_client

from shipyard import contract
from shipyard.runtime import batching, faults, httpproto, metrics, oip, openaiproto, shadowplan
from shipyard.runtime.server import settings

log = logging.getLogger("shipyard.runtime.server")

SERVER_NAME = "shipyard"
SERVER_VERSION = "0.1.0"
RETRY_AFTER = b"retry-after: 1\r\n"
SHADOW_POLL_S = 1.0  # how often the shadow settings file (SHIPYARD_SHADOW_CONFIG) is read
SHADOW_FILE_MAX_BYTES = 65536

# Route kinds and the methods they accept.
LIVE, READY, SERVER_META, MODEL_META, MODEL_READY, INFER, METRICS, UNMATCHED, EMBEDDINGS = (
    "live",
    "ready",
    "server_meta",
    "model_meta",
    "model_ready",
    "infer",
    "metrics",
    "unmatched",
    "embeddings",
)
ALLOWED_METHODS = {
    LIVE: ("GET",),
    READY: ("GET",),
    SERVER_META: ("GET",),
    MODEL_META: ("GET",),
    MODEL_READY: ("GET",),
    INFER: ("POST",),
    METRICS: ("GET",),
    EMBEDDINGS: ("POST",),
}
_STATIC_ROUTES = {
    contract.PATH_LIVE: (contract.PATH_LIVE, LIVE),
    contract.PATH_READY: (contract.PATH_READY, READY),
    contract.PATH_METRICS: (contract.PATH_METRICS, METRICS),
    "/v2": ("/v2", SERVER_META),
    openaiproto.PATH: (openaiproto.PATH, EMBEDDINGS),
}


@dataclass(frozen=True, slots=True)
class Route:
    template: str  # the label for http_request_duration_seconds: never the raw path
    kind: str
    model: str | None = None
    version: str | None = None


def plan_route(path: str) -> Route:
    """Match a request path (without query) to an endpoint (pure)."""
    static = _STATIC_ROUTES.get(path) or _STATIC_ROUTES.get(path.rstrip("/") or "/")
    if static is not None:
        return Route(static[0], static[1])
    if path.startswith("/v2/models/"):
        parts = path[len("/v2/models/") :].split("/")
        if parts and parts[-1] == "":
            parts.pop()
        if parts and parts[0]:
            name = unquote(parts[0])
            rest = parts[1:]
            version = None
            prefix = "/v2/models/{name}"
            if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
                version = unquote(rest[1])
                rest = rest[2:]
                prefix += "/versions/{version}"
            if not rest:
                return Route(prefix, MODEL_META, name, version)
            if rest == ["ready"]:
                return Route(prefix + "/ready", MODEL_READY, name, version)
            if rest == ["infer"]:
                return Route(prefix + "/infer", INFER, name, version)
    return Route(UNMATCHED, UNMATCHED)


LOADING, SERVING, DRAINING = "loading", "serving", "draining"
_ROUTE_CACHE_SIZE = 256


class InferContext:
    """Per-inference-request state carried through the batcher (the job's context): an HTTP request."""

    __slots__ = ("conn", "request", "template", "started")

    def __init__(self, conn: httpproto.Connection, request: httpproto.Request, template: str) -> None:
        self.conn = conn
        self.request = request
        self.template = template
        self.started = request.started


class EmbeddingsContext:
    """A `POST /v1/embeddings` request's place in the batcher: its answer is an OpenAI document."""

    __slots__ = ("app", "conn", "request", "started", "parsed", "tokens")

    def __init__(self, app: App, conn: httpproto.Connection, request: httpproto.Request) -> None:
        self.app = app
        self.conn = conn
        self.request = request
        self.started = request.started
        self.parsed: openaiproto.EmbeddingsRequest | None = None
        self.tokens = 0

    def deliver(self, result: batching.JobResult) -> None:
        parsed = self.parsed
        assert parsed is not None
        if isinstance(result, list):
            try:
                body = openaiproto.build_embeddings_response(
                    parsed.model, result[0], parsed.encoding_format, parsed.dimensions, self.tokens
                )
            except openaiproto.OpenAIError as error:
                self.app.answer_openai(self, error.status, openaiproto.build_error_body(error))
                return
            self.app.answer_openai(self, 200, body)
            return
        failure = result if isinstance(result, BaseException) else oip.ModelFailure("no result")
        mapped = openaiproto.build_openai_error(failure)
        self.app.answer_openai(self, mapped.status, openaiproto.build_error_body(mapped))


class ForeignContext(Protocol):
    """The context of a job another front end submitted (`App.submit`, e.g. gRPC): it answers its own client."""

    @property
    def started(self) -> float: ...  # time.perf_counter() at arrival (the per-request timeout counts from it)

    def deliver(self, result: batching.JobResult) -> None: ...  # the outputs, or the exception to answer with


class App:
    """Request handling and server state for one model (everything runs on one event loop)."""

    def __init__(self, config: settings.ServerConfig, server_metrics: metrics.ServerMetrics) -> None:
        self.config = config
        self.metrics = server_metrics
        self.model_name = config.model_name
        self.model_version = config.model_version
        self.faults = faults.FaultInjector(
            faults.build_fault_config(config.fault_error_rate, config.fault_extra_latency_ms, config.fault_seed)
        )
        self.state = LOADING
        self.ready = False
        self.not_ready_reason = "the model is loading"
        self.inputs: list[oip.TensorSpecLike] = []  # what the metadata lists (with text in, the text input too)
        self.outputs: list[oip.TensorSpecLike] = []
        self.text: Any = None  # textinput.TextInput when the model takes text
        self.embeddings_problem: str | None = "the model is loading"  # why /v1/embeddings is not served
        self.batcher: batching.Batcher | None = None
        self.inflight_infer = 0
        self._inflight_jobs: dict[batching.Job, None] = {}  # insertion (= arrival) order, for timeouts
        self._routes: dict[bytes, Route] = {}
        self._metadata_body = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.readiness_listeners: list[Callable[[bool], None]] = []  # called with `ready` whenever it changes
        self._sweeper: asyncio.TimerHandle | None = None
        self.shadow: Any = None  # shadow.Shadow while shadowing: answered requests are copied to a candidate
        self._shadow_seen: object = None  # what the shadow settings file held at the last poll
        self._shadow_self_noted: str | None = None  # the own version, once told that settings naming it are ignored
        self._shadow_poller: asyncio.TimerHandle | None = None
        self._shadow_polling = bool(config.shadow_file)
        if config.shadow is not None:
            self._set_shadow(config.shadow)
        if config.shadow is not None or config.shadow_file:
            # Without shadow settings the answering path stays exactly what it was: no check per request.
            self._send = self._send_and_shadow  # type: ignore[method-assign]

    # -- lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        interval = min(0.1, self.config.request_timeout_s / 10)
        self._sweep_interval = interval
        self._sweeper = loop.call_later(interval, self._sweep_timeouts)
        if self.shadow is not None:
            self.shadow.start(loop)
        if self.config.shadow_file:
            self._poll_shadow_file()

    def set_serving(
        self,
        inputs: Sequence[oip.TensorSpecLike],
        outputs: Sequence[oip.TensorSpecLike],
        batcher: batching.Batcher,
        text: Any = None,
    ) -> None:
        """Serve: `inputs`/`outputs` as the model declares them; `text` (a textinput.TextInput) when it takes text,
        whose served inputs (the declared ones and the text input) the metadata then lists."""
        self.text = text
        self.inputs = list(inputs) if text is None else list(text.served_inputs)
        self.outputs = list(outputs)
        self.embeddings_problem = openaiproto.assess_embedding_model(text is not None, self.outputs)
        self.batcher = batcher
        self._metadata_body = orjson.dumps(
            oip.build_model_metadata(self.model_name, self.model_version, self.inputs, self.outputs)
        )
        self.state = SERVING
        self.ready = True
        self.metrics.model_ready.set(1)
        for listener in self.readiness_listeners:
            listener(True)

    def set_draining(self) -> None:
        self.state = DRAINING if self.batcher is not None else self.state
        self.ready = False
        self.not_ready_reason = "the server is shutting down"
        self.metrics.model_ready.set(0)
        for listener in self.readiness_listeners:
            listener(False)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._shadow_polling = False
        if self._shadow_poller is not None:
            self._shadow_poller.cancel()
            self._shadow_poller = None
        if self.shadow is not None:
            self.shadow.stop()

    # -- shadow traffic
    def _set_shadow(self, config: shadowplan.ShadowConfig | None) -> None:
        """Shadow to `config` from now on (None: stop shadowing). Client requests are never touched: a request
        answered before the switch may still be copied under the old settings, and copies in flight to a previous
        candidate are abandoned. The counters of a candidate are kept while only its percent, tolerance or bounds
        change, and removed from /metrics once shadowing to it ends."""
        from shipyard.runtime.server import shadow  # only with shadow traffic

        old = self.shadow
        if config is not None and config.candidate == self.config.model_version:
            # Every server of a model reads the same settings (one ConfigMap): the candidate's own pods find their
            # version there and must not copy the copies they answer to themselves.
            if old is not None or self._shadow_self_noted is not config.candidate:
                log.info("The shadow settings name this server's own version %s: not shadowing", config.candidate)
                self._shadow_self_noted = config.candidate
            config = None
        if old is not None and config is not None and old.config == config:
            return
        same_series = (old is not None and config is not None
                       and (old.config.candidate, old.config.compare) == (config.candidate, config.compare))
        if old is not None:
            old.stop()
            if not same_series:
                old.metrics.close()
        if config is None:
            self.shadow = None
            if old is not None:
                log.info("Stopped shadowing to %s (candidate %s)", old.config.display, old.config.candidate)
            return
        shadow_metrics = old.metrics if same_series and old is not None else metrics.ShadowMetrics(
            self.metrics, config.candidate, config.compare)
        self.shadow = shadow.Shadow(config, self.model_name, shadow_metrics)
        if self._loop is not None:
            self.shadow.start(self._loop)

    def _poll_shadow_file(self) -> None:
        """Reads the shadow settings file (``config.shadow_file``) and switches shadowing when it changed; again in
        ``SHADOW_POLL_S``. Missing or empty: off; invalid: logged with the reason, and off. Never raises."""
        path = self.config.shadow_file
        assert path is not None
        try:
            problem: str | None = None
            try:
                with open(path, "rb") as handle:
                    raw = handle.read(SHADOW_FILE_MAX_BYTES + 1)
            except FileNotFoundError:
                raw = b""
            except OSError as error:
                raw, problem = b"", f"cannot be read: {error}"
            seen = (raw, problem)
            if seen != self._shadow_seen:
                self._shadow_seen = seen
                config: shadowplan.ShadowConfig | None = None
                if problem is None and len(raw) > SHADOW_FILE_MAX_BYTES:
                    problem = f"is larger than {SHADOW_FILE_MAX_BYTES} bytes"
                if problem is None:
                    try:
                        config = shadowplan.build_shadow_file_config(raw)
                    except shadowplan.ShadowConfigError as error:
                        problem = str(error)
                if problem is not None:
                    log.warning("Ignored the shadow settings in %s: %s; shadowing is off", path, problem)
                self._set_shadow(config)
        except Exception:  # a bug here must never break serving
            log.exception("Failed to apply the shadow settings in %s", path)
        finally:
            if self._shadow_polling and self._loop is not None and not self._loop.is_closed():
                self._shadow_poller = self._loop.call_later(SHADOW_POLL_S, self._poll_shadow_file)

    # -- httpproto.Application
    def observe_rejected(self, request: httpproto.Request, status: int) -> None:
        """Count a request refused before it was read whole (413, 431, 400 malformed HTTP)."""
        elapsed = time.perf_counter() - request.started
        route = plan_route(request.path.decode("utf-8", "replace")) if request.url else Route(UNMATCHED, UNMATCHED)
        if route.kind == INFER:
            self.metrics.observe_request(status, elapsed)
        self.metrics.observe_http(request.method, route.template, status, elapsed)

    def handle(self, conn: httpproto.Connection, request: httpproto.Request) -> None:
        url = request.url
        route = self._routes.get(url)
        if route is None:
            path = request.path.decode("utf-8", "replace")
            route = plan_route(path)
            if route.kind != UNMATCHED and len(self._routes) < _ROUTE_CACHE_SIZE:
                self._routes[url] = route
        kind = route.kind
        if kind == INFER and request.method == "POST":
            self._infer(conn, request, route)
            return
        if kind == EMBEDDINGS and request.method == "POST":
            self._embeddings(conn, request)
            return
        try:
            if kind == UNMATCHED:
                raise oip.RouteNotFound(f"no endpoint at {request.path.decode('utf-8', 'replace')}")
            allowed = ALLOWED_METHODS[kind]
            if request.method not in allowed:
                raise oip.MethodNotAllowed(f"{request.method} is not allowed here; use {', '.join(allowed)}")
            if kind == INFER:  # counted as an inference request too
                raise oip.MethodNotAllowed("POST is the method of the infer endpoint")
            status, body, content_type = self._read_endpoint(kind, route)
        except oip.ServingError as error:
            status = oip.build_error_status(error)
            body, content_type = oip.build_error_body(str(error)), httpproto.JSON
            if kind == INFER:
                self.metrics.observe_request(status, time.perf_counter() - request.started)
        except Exception as error:  # a bug: 500, and the server goes on
            log.exception("Failed to answer %s %s", request.method, route.template)
            status, content_type = 500, httpproto.JSON
            body = oip.build_error_body(f"internal server error: {type(error).__name__}")
        extra = b"allow: %s\r\n" % ", ".join(ALLOWED_METHODS[kind]).encode() if status == 405 else b""
        self.metrics.observe_http(request.method, route.template, status, time.perf_counter() - request.started)
        conn.respond(request, status, body, content_type, extra)

    def _read_endpoint(self, kind: str, route: Route) -> tuple[int, bytes, bytes]:
        if kind == LIVE:
            return 200, b'{"live":true}', httpproto.JSON
        if kind == READY:
            if self.ready:
                return 200, b'{"ready":true}', httpproto.JSON
            return 503, orjson.dumps({"ready": False, "error": self.not_ready_reason}), httpproto.JSON
        if kind == METRICS:
            return 200, self.metrics.build_exposition(), prometheus_client.CONTENT_TYPE_LATEST.encode()
        if kind == SERVER_META:
            document = {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": [oip.BINARY_EXTENSION]}
            return 200, orjson.dumps(document), httpproto.JSON
        self._check_model(route)
        if kind == MODEL_READY:
            if self.ready:
                return 200, orjson.dumps({"name": self.model_name, "ready": True}), httpproto.JSON
            body = {"name": self.model_name, "ready": False, "error": self.not_ready_reason}
            return 503, orjson.dumps(body), httpproto.JSON
        # MODEL_META
        if self.batcher is None:
            raise oip.NotReady(self.not_ready_reason)
        return 200, self._metadata_body, httpproto.JSON

    def check_model(self, model: str, version: str | None) -> None:
        """Raise oip.ModelNotFound unless this server serves that model (and version, when given)."""
        self._check_model(Route("", MODEL_READY, model, version))

    def _check_model(self, route: Route) -> None:
        if route.model != self.model_name:
            raise oip.ModelNotFound(f"unknown model {route.model!r}; this server serves {self.model_name!r}")
        if route.version is not None and route.version != self.model_version:
            raise oip.ModelNotFound(
                f"unknown version {route.version!r} of model {route.model!r}; served: {self.model_version!r}"
            )

    # -- inference
    def _infer(self, conn: httpproto.Connection, request: httpproto.Request, route: Route) -> None:
        self.inflight_infer += 1
        self.metrics.inflight.inc()
        context = InferContext(conn, request, route.template)
        try:
            self._check_model(route)
            batcher = self.batcher
            if batcher is None:
                raise oip.NotReady(self.not_ready_reason)
            text = self.text
            if text is None:
                parsed = oip.build_infer_request(request.body, self.inputs, self.outputs, request.inference_header)
            else:
                parsed = text.build_infer_request(request.body, request.inference_header, self.outputs)
            if self.faults.should_fail():
                raise oip.InjectedFault("injected fault (fault injection is on)")
            job = batching.Job(parsed, context)
            batcher.submit(job)
        except oip.ServingError as error:
            self._finish(context, oip.build_error_status(error), oip.build_error_body(str(error)))
            return
        except Exception as error:  # a bug, not the client's fault: 500, and the server goes on
            log.exception("Failed to handle an inference request")
            self._finish(context, 500, oip.build_error_body(f"internal server error: {type(error).__name__}"))
            return
        self._inflight_jobs[job] = None

    def _embeddings(self, conn: httpproto.Connection, request: httpproto.Request) -> None:
        """`POST /v1/embeddings`: tokenized, then queued in the same batcher as inference requests."""
        self.inflight_infer += 1
        self.metrics.inflight.inc()
        context = EmbeddingsContext(self, conn, request)
        try:
            parsed = openaiproto.build_embeddings_request(request.body)
            context.parsed = parsed
            if parsed.model != self.model_name:
                raise openaiproto.OpenAIError(404, f"The model {parsed.model!r} does not exist; this server serves "
                                                   f"{self.model_name!r}", param="model", code="model_not_found")
            batcher = self.batcher
            if batcher is None:
                raise oip.NotReady(self.not_ready_reason)
            if self.embeddings_problem is not None:
                raise openaiproto.OpenAIError(
                    404, f"The model {parsed.model!r} does not serve embeddings: {self.embeddings_problem}",
                    param="model", code="model_not_found")
            text = self.text
            if parsed.texts is not None:
                infer_request, context.tokens = text.build_model_request(parsed.texts, [])
            else:
                assert parsed.token_ids is not None
                infer_request, context.tokens = text.build_token_request(parsed.token_ids)
            if self.faults.should_fail():
                raise oip.InjectedFault("injected fault (fault injection is on)")
            job = batching.Job(infer_request, context)
            batcher.submit(job)
        except Exception as error:
            known: Exception = error
            if not isinstance(error, oip.ServingError | openaiproto.OpenAIError):
                log.exception("Failed to handle an embeddings request")
                known = oip.ModelFailure(f"internal server error: {type(error).__name__}")
            failure = openaiproto.build_openai_error(known)
            self.answer_openai(context, failure.status, openaiproto.build_error_body(failure))
            return
        self._inflight_jobs[job] = None

    def answer_openai(self, context: EmbeddingsContext, status: int, body: bytes) -> None:
        """Answer an embeddings request (after the injected latency, if any); counted as protocol "openai"."""
        delay = self.faults.config.extra_latency_s
        if delay > 0 and self._loop is not None:
            self._loop.call_later(delay, self._send_openai, context, status, body)
        else:
            self._send_openai(context, status, body)

    def _send_openai(self, context: EmbeddingsContext, status: int, body: bytes) -> None:
        request = context.request
        elapsed = time.perf_counter() - request.started
        self.metrics.observe_protocol_request(contract.PROTOCOL_OPENAI, status, elapsed)
        self.metrics.observe_http(request.method, openaiproto.PATH, status, elapsed)
        self.metrics.inflight.dec()
        self.inflight_infer -= 1
        context.conn.respond(request, status, body, httpproto.JSON, RETRY_AFTER if status == 503 else b"")

    def submit(
        self, request: oip.InferRequest, context: ForeignContext, model: str, version: str | None
    ) -> batching.Job:
        """Queue an inference request another front end parsed (the gRPC one): the same model check, readiness,
        fault injection, queue bound and per-request timeout as HTTP; the answer goes to `context.deliver`.
        Raises oip.ServingError."""
        self.check_model(model, version)
        batcher = self.batcher
        if batcher is None:
            raise oip.NotReady(self.not_ready_reason)
        if self.faults.should_fail():
            raise oip.InjectedFault("injected fault (fault injection is on)")
        job = batching.Job(request, context)
        batcher.submit(job)
        self._inflight_jobs[job] = None
        return job

    def on_result(self, job: batching.Job, result: batching.JobResult) -> None:
        """Batcher callback: a job's outputs (or error) are in."""
        self._inflight_jobs.pop(job, None)
        context = job.context
        if type(context) is not InferContext:  # another front end's job
            context.deliver(result)
            return
        if isinstance(result, list):
            parsed = job.request
            header_length = None
            try:
                if parsed.binary_outputs is None:
                    body = oip.build_infer_response(
                        self.model_name,
                        self.model_version,
                        parsed.request_id,
                        self.outputs,
                        result,
                        parsed.output_indices,
                    )
                else:  # the binary tensor data extension: a JSON header, then raw output bytes
                    body, header_length = oip.build_binary_infer_response(
                        self.model_name,
                        self.model_version,
                        parsed.request_id,
                        self.outputs,
                        result,
                        parsed.output_indices,
                        parsed.binary_outputs,
                    )
            except Exception as error:  # e.g. an output orjson cannot encode: this request fails, not its batch
                log.exception("Failed to encode an inference response")
                self._finish(context, 500, oip.build_error_body(f"could not encode the outputs: {error}"))
                return
            self._finish(context, 200, body, header_length)
        else:
            failure = result if isinstance(result, BaseException) else oip.ModelFailure("no result")
            self._finish(context, oip.build_error_status(failure), oip.build_error_body(str(failure)))

    def on_batch_started(self, jobs: list[batching.Job], rows: int, now: float) -> None:
        self.metrics.observe_batch(rows, [now - job.enqueued_at for job in jobs])

    def _finish(self, context: InferContext, status: int, body: bytes, header_length: int | None = None) -> None:
        delay = self.faults.config.extra_latency_s
        if delay > 0 and self._loop is not None:
            self._loop.call_later(delay, self._send, context, status, body, header_length)
        else:
            self._send(context, status, body, header_length)

    def _send(self, context: InferContext, status: int, body: bytes, header_length: int | None = None) -> None:
        """Answer an inference request; `header_length`: the body is a JSON header of that length and binary
        outputs (the binary tensor data extension)."""
        request = context.request
        elapsed = time.perf_counter() - request.started
        self.metrics.observe_request(status, elapsed)
        self.metrics.observe_http(request.method, context.template, status, elapsed)
        self.metrics.inflight.dec()
        self.inflight_infer -= 1
        if header_length is not None:
            extra = b"inference-header-content-length: %d\r\n" % header_length
            context.conn.respond(request, status, body, httpproto.OCTET_STREAM, extra)
            return
        # 503 = overloaded or not ready: tell clients (and retrying proxies) when to come back.
        context.conn.respond(request, status, body, httpproto.JSON, RETRY_AFTER if status == 503 else b"")

    def _send_and_shadow(
        self, context: InferContext, status: int, body: bytes, header_length: int | None = None
    ) -> None:
        """`_send` with shadow traffic: the client's answer first, then (a 200) the copy to the candidate, which
        the client never waits for."""
        App._send(self, context, status, body, header_length)
        shadowing = self.shadow
        if status == 200 and shadowing is not None:
            request = context.request
            shadowing.offer(request.body, request.inference_header, body, header_length)

    def _sweep_timeouts(self) -> None:
        """Answer 504 to inference requests older than the per-request timeout (arrival = deadline order)."""
        limit = time.perf_counter() - self.config.request_timeout_s
        expired = []
        for job in self._inflight_jobs:
            if job.context.started > limit:
                break
            expired.append(job)
        for job in expired:
            del self._inflight_jobs[job]
            if self.batcher is not None:
                self.batcher.cancel(job)
            error = oip.RequestTimeout(f"no answer within {self.config.request_timeout_s:g} s")
            if type(job.context) is not InferContext:
                job.context.deliver(error)
                continue
            self._finish(job.context, 504, oip.build_error_body(str(error)))
        if self._loop is not None:
            self._sweeper = self._loop.call_later(self._sweep_interval, self._sweep_timeouts)

    def fail_remaining(self, message: str) -> None:
        """At the end of a drain that ran out of time: answer what is still queued or running with 503."""
        for job in list(self._inflight_jobs):
            del self._inflight_jobs[job]
            if self.batcher is not None:
                self.batcher.cancel(job)
            if type(job.context) is not InferContext:
                job.context.deliver(oip.NotReady(message))
                continue
            self._send(job.context, 503, oip.build_error_body(message))

    def forget(self, job: batching.Job) -> None:
        """Drop a job whose client went away (gRPC cancellation): out of the queue and the timeout sweep."""
        self._inflight_jobs.pop(job, None)
        if self.batcher is not None:
            self.batcher.cancel(job)
