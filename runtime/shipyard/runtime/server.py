"""`shipyard-runtime serve`: the inference server (Open Inference Protocol v2 over REST).

Wiring and lifecycle, with I/O: it listens on a socket at once (liveness answers while the model loads),
loads the artifact and warms it up on every device (readiness turns true only then), batches requests
dynamically in front of one worker thread per device, exports Prometheus metrics on the same port, injects
faults when configured, and drains gracefully on SIGTERM: readiness 503 first, a propagation window during
which it keeps serving, then no new connections, in-flight requests finish, exit within the grace period.

Pure pieces: `build_config` (flags over environment), `plan_route` (path -> route template).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import prometheus_client

from shipyard import contract
from shipyard.runtime import batching, faults, httpproto, metrics, oip

log = logging.getLogger("shipyard.runtime.server")

SERVER_NAME = "shipyard"
SERVER_VERSION = "0.1.0"
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_DELAY_MS = 5.0
DEFAULT_MAX_QUEUE = 512
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 75.0  # longer than common load balancers' idle timeouts (60 s)
DEFAULT_DRAIN_PROPAGATION_S = 5.0
DEFAULT_GRACE_PERIOD_S = 30.0
EXIT_MARGIN_S = 1.0  # the server is gone this long before the grace period (kubelet's SIGKILL) ends
UNVERSIONED = "unknown"
COMPILED_MODES = ("auto", "on", "off")
RETRY_AFTER = b"retry-after: 1\r\n"

# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ServerConfig:
    artifact: str
    host: str = "0.0.0.0"
    port: int = contract.SERVING_PORT
    model_name: str = ""
    model_version: str = UNVERSIONED
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S
    drain_propagation_s: float = DEFAULT_DRAIN_PROPAGATION_S
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S
    fault_error_rate: float = 0.0
    fault_extra_latency_ms: float = 0.0
    fault_seed: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    compile_mode: str | None = None
    compiled: str = "auto"  # the artifact's AOTInductor package: auto (when it fits) | on (required) | off
    threads: int | None = None  # torch intra-op threads; None = from the CPU limit
    warmup_iterations: int = 3
    log_level: str = "INFO"
    uvloop: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)


class ConfigError(ValueError):
    """A flag or environment variable has an invalid value."""


def _env_number(env: Mapping[str, str], name: str, kind: Callable[[str], Any]) -> Any:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return kind(raw.strip())
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{contract.RUNTIME_COMMAND} {contract.SERVE_SUBCOMMAND}",
        description="Serve a model artifact over the Open Inference Protocol v2 (REST). Flags override the "
        "environment the operator sets.",
    )
    add = parser.add_argument
    add("--artifact", help=f"model artifact directory (env {contract.ENV_ARTIFACT_PATH})")
    add("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    add(
        "--port",
        type=int,
        default=contract.SERVING_PORT,
        help=f"listen port (default {contract.SERVING_PORT})",
    )
    add(
        "--model-name",
        help=f"OIP model name (env {contract.ENV_MODEL_NAME}; default: the artifact folder name)",
    )
    add("--model-version", help=f"version reported in metadata and metrics (env {contract.ENV_MODEL_VERSION})")
    add("--max-batch-size", type=int, help=f"rows per batch (env {contract.ENV_MAX_BATCH_SIZE}; default 32)")
    add(
        "--max-delay-ms",
        type=float,
        help=f"longest a partial batch may wait to fill under saturation (env {contract.ENV_MAX_DELAY_MS}; default 5)",
    )
    add("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="queued requests before 503 (default 512)")
    add(
        "--max-payload-bytes",
        type=int,
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        help="request body limit (413 above)",
    )
    add("--request-timeout-s", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, help="per-request timeout (504)")
    add(
        "--keep-alive-timeout-s",
        type=float,
        default=DEFAULT_KEEP_ALIVE_TIMEOUT_S,
        help="close connections idle this long, and answer 408 to a request half-received this long (default 75)",
    )
    add(
        "--drain-propagation-s",
        type=float,
        default=DEFAULT_DRAIN_PROPAGATION_S,
        help="after SIGTERM, keep serving this long with readiness false (endpoint propagation)",
    )
    add(
        "--grace-period-s",
        type=float,
        default=DEFAULT_GRACE_PERIOD_S,
        help="exit within this long after SIGTERM (match terminationGracePeriodSeconds)",
    )
    add(
        "--fault-error-rate",
        type=float,
        help=f"fraction of requests failed with 500 (env {contract.ENV_FAULT_ERROR_RATE})",
    )
    add(
        "--fault-extra-latency-ms",
        type=float,
        help=f"latency added to every inference response (env {contract.ENV_FAULT_EXTRA_LATENCY_MS})",
    )
    add("--fault-seed", type=int, help="seed of the fault draws (reproducible runs)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N[,M] (default auto: every GPU, else CPU)")
    add("--dtype", default="float32", help="float32 | float16 | bfloat16 (default float32)")
    add("--compile", action="store_true", help="torch.compile the model before warm-up")
    add("--compile-mode", help="torch.compile mode, e.g. reduce-overhead or max-autotune")
    add("--compiled", choices=COMPILED_MODES, default="auto",
        help="serve the artifact's AOTInductor package: auto (default: when the artifact has one that fits the "
        "device, torch version, dtype and max batch size; else the eager model, saying why) | on (fail without "
        "it) | off (always the eager model)")
    add("--threads", type=int, help="torch intra-op threads (default: OMP_NUM_THREADS when set, else the cgroup CPU "
        "limit / affinity)")
    add("--warmup-iterations", type=int, default=3, help="forward passes per warm-up batch size (default 3)")
    add("--log-level", default="INFO", help="logging level (default INFO)")
    add("--no-uvloop", dest="uvloop", action="store_false", help="use the standard asyncio event loop")
    return parser


def build_config(argv: Sequence[str], env: Mapping[str, str]) -> ServerConfig:
    """The server configuration from command-line flags over the operator's environment (pure).

    Raises ConfigError naming the flag or variable at fault.
    """
    parser = build_parser()
    args = parser.parse_args(list(argv))
    artifact = args.artifact or env.get(contract.ENV_ARTIFACT_PATH, "")
    if not artifact:
        raise ConfigError(f"no artifact: pass --artifact PATH or set {contract.ENV_ARTIFACT_PATH}")

    def pick(flag: Any, name: str, kind: Callable[[str], Any], default: Any) -> Any:
        if flag is not None:
            return flag
        value = _env_number(env, name, kind)
        return default if value is None else value

    model_name = args.model_name or env.get(contract.ENV_MODEL_NAME, "").strip() or Path(artifact).name
    model_version = args.model_version or env.get(contract.ENV_MODEL_VERSION, "").strip() or UNVERSIONED
    config = ServerConfig(
        artifact=artifact,
        host=args.host,
        port=args.port,
        model_name=model_name,
        model_version=model_version,
        max_batch_size=pick(args.max_batch_size, contract.ENV_MAX_BATCH_SIZE, int, DEFAULT_MAX_BATCH_SIZE),
        max_delay_ms=pick(args.max_delay_ms, contract.ENV_MAX_DELAY_MS, float, DEFAULT_MAX_DELAY_MS),
        max_queue=args.max_queue,
        max_payload_bytes=args.max_payload_bytes,
        request_timeout_s=args.request_timeout_s,
        keep_alive_timeout_s=args.keep_alive_timeout_s,
        drain_propagation_s=args.drain_propagation_s,
        grace_period_s=args.grace_period_s,
        fault_error_rate=pick(args.fault_error_rate, contract.ENV_FAULT_ERROR_RATE, float, 0.0),
        fault_extra_latency_ms=pick(args.fault_extra_latency_ms, contract.ENV_FAULT_EXTRA_LATENCY_MS, float, 0.0),
        fault_seed=args.fault_seed,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compiled=args.compiled,
        threads=args.threads,
        warmup_iterations=args.warmup_iterations,
        log_level=args.log_level.upper(),
        uvloop=args.uvloop,
    )
    return assess_config(config)


def assess_config(config: ServerConfig) -> ServerConfig:
    """Check value ranges; raises ConfigError naming the setting (pure)."""
    checks = [
        (1 <= config.port <= 65535 or config.port == 0, "--port must be within 0..65535"),
        (config.max_batch_size >= 1, f"max batch size must be >= 1 ({contract.ENV_MAX_BATCH_SIZE})"),
        (config.max_delay_ms >= 0, f"max delay must be >= 0 ms ({contract.ENV_MAX_DELAY_MS})"),
        (config.max_queue >= 1, "--max-queue must be >= 1"),
        (config.max_payload_bytes >= 1024, "--max-payload-bytes must be >= 1024"),
        (config.request_timeout_s > 0, "--request-timeout-s must be > 0"),
        (config.keep_alive_timeout_s > 0, "--keep-alive-timeout-s must be > 0"),
        (config.drain_propagation_s >= 0, "--drain-propagation-s must be >= 0"),
        (config.grace_period_s > 0, "--grace-period-s must be > 0"),
        (config.threads is None or config.threads >= 1, "--threads must be >= 1"),
        (config.warmup_iterations >= 0, "--warmup-iterations must be >= 0"),
        (
            bool(config.model_name) and "/" not in config.model_name,
            "the model name must be non-empty without '/'",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        faults.build_fault_config(config.fault_error_rate, config.fault_extra_latency_ms)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return config


# ---------------------------------------------------------------------------------------------- routes

# Route kinds and the methods they accept.
LIVE, READY, SERVER_META, MODEL_META, MODEL_READY, INFER, METRICS, UNMATCHED = (
    "live",
    "ready",
    "server_meta",
    "model_meta",
    "model_ready",
    "infer",
    "metrics",
    "unmatched",
)
ALLOWED_METHODS = {
    LIVE: ("GET",),
    READY: ("GET",),
    SERVER_META: ("GET",),
    MODEL_META: ("GET",),
    MODEL_READY: ("GET",),
    INFER: ("POST",),
    METRICS: ("GET",),
}
_STATIC_ROUTES = {
    contract.PATH_LIVE: (contract.PATH_LIVE, LIVE),
    contract.PATH_READY: (contract.PATH_READY, READY),
    contract.PATH_METRICS: (contract.PATH_METRICS, METRICS),
    "/v2": ("/v2", SERVER_META),
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


# ---------------------------------------------------------------------------------------------- app

LOADING, SERVING, DRAINING = "loading", "serving", "draining"
_ROUTE_CACHE_SIZE = 256


class InferContext:
    """Per-inference-request state carried through the batcher (the job's context)."""

    __slots__ = ("conn", "request", "template")

    def __init__(self, conn: httpproto.Connection, request: httpproto.Request, template: str) -> None:
        self.conn = conn
        self.request = request
        self.template = template


class App:
    """Request handling and server state for one model (everything runs on one event loop)."""

    def __init__(self, config: ServerConfig, server_metrics: metrics.ServerMetrics) -> None:
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
        self.inputs: list[oip.TensorSpecLike] = []
        self.outputs: list[oip.TensorSpecLike] = []
        self.batcher: batching.Batcher | None = None
        self.inflight_infer = 0
        self._inflight_jobs: dict[batching.Job, None] = {}  # insertion (= arrival) order, for timeouts
        self._routes: dict[bytes, Route] = {}
        self._metadata_body = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    # -- lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        interval = min(0.1, self.config.request_timeout_s / 10)
        self._sweep_interval = interval
        self._sweeper = loop.call_later(interval, self._sweep_timeouts)

    def set_serving(
        self,
        inputs: Sequence[oip.TensorSpecLike],
        outputs: Sequence[oip.TensorSpecLike],
        batcher: batching.Batcher,
    ) -> None:
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.batcher = batcher
        self._metadata_body = orjson.dumps(
            oip.build_model_metadata(self.model_name, self.model_version, self.inputs, self.outputs)
        )
        self.state = SERVING
        self.ready = True
        self.metrics.model_ready.set(1)

    def set_draining(self) -> None:
        self.state = DRAINING if self.batcher is not None else self.state
        self.ready = False
        self.not_ready_reason = "the server is shutting down"
        self.metrics.model_ready.set(0)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

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
            document = {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []}
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
            parsed = oip.build_infer_request(request.body, self.inputs, self.outputs)
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

    def on_result(self, job: batching.Job, result: batching.JobResult) -> None:
        """Batcher callback: a job's outputs (or error) are in."""
        self._inflight_jobs.pop(job, None)
        context: InferContext = job.context
        if isinstance(result, list):
            try:
                body = oip.build_infer_response(
                    self.model_name,
                    self.model_version,
                    job.request.request_id,
                    self.outputs,
                    result,
                    job.request.output_indices,
                )
            except Exception as error:  # e.g. an output orjson cannot encode: this request fails, not its batch
                log.exception("Failed to encode an inference response")
                self._finish(context, 500, oip.build_error_body(f"could not encode the outputs: {error}"))
                return
            self._finish(context, 200, body)
        else:
            failure = result if isinstance(result, BaseException) else oip.ModelFailure("no result")
            self._finish(context, oip.build_error_status(failure), oip.build_error_body(str(failure)))

    def on_batch_started(self, jobs: list[batching.Job], rows: int, now: float) -> None:
        self.metrics.observe_batch(rows, [now - job.enqueued_at for job in jobs])

    def _finish(self, context: InferContext, status: int, body: bytes) -> None:
        delay = self.faults.config.extra_latency_s
        if delay > 0 and self._loop is not None:
            self._loop.call_later(delay, self._send, context, status, body)
        else:
            self._send(context, status, body)

    def _send(self, context: InferContext, status: int, body: bytes) -> None:
        request = context.request
        elapsed = time.perf_counter() - request.started
        self.metrics.observe_request(status, elapsed)
        self.metrics.observe_http(request.method, context.template, status, elapsed)
        self.metrics.inflight.dec()
        self.inflight_infer -= 1
        # 503 = overloaded or not ready: tell clients (and retrying proxies) when to come back.
        context.conn.respond(request, status, body, httpproto.JSON, RETRY_AFTER if status == 503 else b"")

    def _sweep_timeouts(self) -> None:
        """Answer 504 to inference requests older than the per-request timeout (arrival = deadline order)."""
        limit = time.perf_counter() - self.config.request_timeout_s
        expired = []
        for job in self._inflight_jobs:
            if job.context.request.started > limit:
                break
            expired.append(job)
        for job in expired:
            del self._inflight_jobs[job]
            if self.batcher is not None:
                self.batcher.cancel(job)
            error = oip.RequestTimeout(f"no answer within {self.config.request_timeout_s:g} s")
            self._finish(job.context, 504, oip.build_error_body(str(error)))
        if self._loop is not None:
            self._sweeper = self._loop.call_later(self._sweep_interval, self._sweep_timeouts)

    def fail_remaining(self, message: str) -> None:
        """At the end of a drain that ran out of time: answer what is still queued or running with 503."""
        for job in list(self._inflight_jobs):
            del self._inflight_jobs[job]
            if self.batcher is not None:
                self.batcher.cancel(job)
            self._send(job.context, 503, oip.build_error_body(message))


# ---------------------------------------------------------------------------------------------- model

Loader = Callable[[str, str], Any]  # (artifact path, device) -> a model with .module, .inputs, .outputs


def plan_compiled(mode: str, problem: str | None) -> tuple[bool, str]:
    """Whether to serve the artifact's AOTInductor package, and why (pure). `problem` is why the package cannot
    serve this configuration (`programs.assess_compiled`), None when it can. Raises ConfigError for mode `on`
    with a problem."""
    if mode == "off":
        return False, "the eager model (--compiled off)"
    if problem is None:
        return True, "the artifact's AOTInductor package"
    if mode == "on":
        raise ConfigError(f"--compiled on: {problem}")
    return False, f"the eager model ({problem})"


def fetch_model(path: str, device: str, config: ServerConfig) -> Any:
    """Load an artifact with the artifacts module (safe loading, manifest, digest): its AOTInductor package when
    `config.compiled` asks for it and it fits (`plan_compiled`), else the eager model."""
    import torch

    from shipyard.runtime import engine  # imported lazily: they pull in torch and the artifact formats
    from shipyard.runtime.artifacts import manifests, programs, store

    directory = Path(path).resolve()
    manifest = manifests.load_verified_manifest(directory)
    problem = None if config.compiled == "off" else programs.assess_compiled(
        manifest, device=device, torch_version=torch.__version__, dtype=engine.plan_dtype(config.dtype, device),
        compile_model=config.compile, max_batch_size=config.max_batch_size,
    )  # fmt: skip
    compiled, what = plan_compiled(config.compiled, problem)
    log.info("Serving %s on %s", what, device)
    return store.load_model_from_manifest(manifest, directory, device=device, compiled=compiled)


def plan_warmup_batches(max_batch_size: int, compiled: bool) -> list[int]:
    """Batch sizes to warm up with (pure): 1 and the largest; with torch.compile also 2, so that the switch to a
    dynamic batch dimension (compile specialises on the first sizes it sees) happens before traffic does."""
    sizes = {1, max_batch_size}
    if compiled:
        sizes.add(min(2, max_batch_size))
    return sorted(sizes)


@dataclass
class LoadedWorkers:
    model: Any  # the model as loaded on the first device (its declared inputs and outputs)
    workers: list[Any]  # engine.DeviceWorker, one per device, started and warmed up
    devices: list[str]
    threads: int


def apply_load(
    config: ServerConfig,
    loader: Loader,
    loop: asyncio.AbstractEventLoop,
    on_done: Callable[[Any, list[batching.Job], list[Any]], None],
) -> LoadedWorkers:
    """Size torch's threads and start one worker per device; each loads the model and warms it up.

    Blocks until every worker is ready; raises the first worker's error (after stopping them all).
    """
    import torch

    from shipyard.runtime import engine

    threads, source = engine.plan_threads(config.threads, os.environ.get("OMP_NUM_THREADS"), engine.fetch_cpu_limit())
    torch.set_num_threads(threads)
    log.info("Torch uses %d intra-op thread(s), from %s", threads, source)
    devices = engine.plan_devices(config.device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    dtypes = [engine.plan_dtype(config.dtype, device) for device in devices]
    models: dict[str, Any] = {}

    def build(device: str, dtype: str) -> Any:
        started = time.perf_counter()
        model = loader(config.artifact, device)
        problems = oip.assess_tensor_specs(model.inputs, model.outputs)
        if problems:
            raise ValueError("; ".join(problems))
        built = engine.Engine(
            model, device, dtype=dtype, compile_model=config.compile, compile_mode=config.compile_mode
        )
        built.warmup(plan_warmup_batches(config.max_batch_size, config.compile), config.warmup_iterations)
        models[device] = model
        log.info(
            "Loaded and warmed up model %s (version %s) on %s in %s in %.2f s",
            config.model_name, config.model_version, device, dtype, time.perf_counter() - started,
        )  # fmt: skip
        return built

    workers = [
        engine.DeviceWorker(device, functools.partial(build, device, dtype), loop, on_done)
        for device, dtype in zip(devices, dtypes, strict=True)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.ready.wait()
    errors = [worker.error for worker in workers if worker.error is not None]
    if errors:
        for worker in workers:
            worker.stop()
        raise errors[0]
    return LoadedWorkers(models[devices[0]], workers, devices, threads)


# --------------------------------------------------------------------------------------------- serving


class Server:
    """One running server: socket, app, batcher, workers; `run` returns the exit code."""

    def __init__(self, config: ServerConfig, loader: Loader | None = None) -> None:
        self.config = config
        # the default loads the artifact (its compiled package per config.compiled); tests inject their own
        self.loader: Loader = loader or functools.partial(fetch_model, config=config)
        self.metrics = metrics.ServerMetrics(config.model_name, config.model_version)
        self.app = App(config, self.metrics)
        self.connections = httpproto.Connections(config.keep_alive_timeout_s)
        self.port: int | None = None
        self.started = threading.Event()  # set once listening (port known)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forced = False
        self._workers: list[Any] = []
        self.exit_code: int | None = None

    def request_drain(self) -> None:
        """Begin the graceful drain (thread-safe; a second call skips the propagation window)."""
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._on_signal)

    def _on_signal(self) -> None:
        assert self._stop is not None
        if self._stop.is_set():
            self._forced = True
            log.warning("Received a second termination signal; skipped the rest of the propagation window")
            return
        self._stop.set()

    async def run(self, install_signals: bool = False, freeze_gc: bool = False) -> int:
        """Serve until drained. `install_signals` and `freeze_gc` are for a process of its own (`run_server`):
        SIGTERM/SIGINT start the drain; objects alive once loaded are frozen out of the garbage collector."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        config = self.config
        app = self.app
        app.start(loop)
        connections = self.connections
        connections.start(loop)
        server = await loop.create_server(
            lambda: httpproto.Connection(app, connections, config.max_payload_bytes),
            config.host,
            config.port,
            reuse_address=True,
            backlog=2048,
        )
        self.port = server.sockets[0].getsockname()[1]
        log.info("Listened on %s:%d; liveness is up, readiness waits for the model", config.host, self.port)
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal)
        self.started.set()

        loaded: asyncio.Future[LoadedWorkers] = loop.create_future()

        def on_done(worker: Any, jobs: list[batching.Job], results: list[Any]) -> None:
            assert self.app.batcher is not None
            self.app.batcher.on_batch_done(worker, jobs, results)

        def load() -> None:
            try:
                result = apply_load(config, self.loader, loop, on_done)
            except BaseException as error:  # reported on the loop
                loop.call_soon_threadsafe(_settle, loaded, None, error)
            else:
                loop.call_soon_threadsafe(_settle, loaded, result, None)

        # A daemon thread, not an executor: a SIGTERM during a long load must not wait for it.
        threading.Thread(target=load, name="load-model", daemon=True).start()
        stop_wait = asyncio.ensure_future(self._stop.wait())
        waited: list[asyncio.Future[Any]] = [loaded, stop_wait]
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        if not loaded.done():
            log.info("Stopped before the model finished loading")
            server.close()
            app.stop()
            connections.stop()
            return 0
        error = loaded.exception()
        if error is not None:
            log.error("Failed to load model %s from %s: %s", config.model_name, config.artifact, error)
            server.close()
            app.stop()
            connections.stop()
            stop_wait.cancel()
            return 1
        result = loaded.result()
        self._start_serving(loop, result)
        # Everything allocated so far (torch, the model, the loaded modules) lives as long as the process: move
        # it out of the collector's sight, so that full collections under load do not walk it (tail latency).
        if freeze_gc:
            gc.collect()
            gc.freeze()
        log.info(
            "Became ready: model %s version %s on %s, %d torch thread(s), max batch %d, max delay %g ms",
            config.model_name,
            config.model_version,
            ",".join(result.devices),
            result.threads,
            config.max_batch_size,
            config.max_delay_ms,
        )
        await stop_wait
        return await self._drain(server)

    def _start_serving(self, loop: asyncio.AbstractEventLoop, loaded: LoadedWorkers) -> None:
        from shipyard.runtime import engine

        app = self.app
        self._workers = loaded.workers
        batcher = batching.Batcher(
            loop,
            self._workers,
            max_batch=self.config.max_batch_size,
            max_delay_s=self.config.max_delay_ms / 1000.0,
            max_queue=self.config.max_queue,
            on_result=app.on_result,
            on_batch_started=app.on_batch_started,
        )
        if any(device.startswith("cuda") for device in loaded.devices):
            devices = loaded.devices
            self.metrics.register_gpu(lambda: engine.fetch_gpu_stats(devices))
        app.set_serving(loaded.model.inputs, loaded.model.outputs, batcher)

    async def _drain(self, server: asyncio.AbstractServer) -> int:
        config = self.config
        app = self.app
        started = time.monotonic()
        deadline = started + max(0.0, config.grace_period_s - EXIT_MARGIN_S)
        propagation = min(config.drain_propagation_s, max(0.0, (deadline - started) / 2))
        app.set_draining()
        log.info(
            "Received termination; readiness turned false, serving for %.1f s more while endpoints update",
            propagation,
        )
        end_of_window = started + propagation
        while not self._forced and time.monotonic() < end_of_window:
            await asyncio.sleep(min(0.05, max(0.0, end_of_window - time.monotonic())))
        server.close()
        connections = self.connections
        connections.begin_close()
        log.info(
            "Stopped accepting connections; waiting for %d in-flight request(s)",
            max(app.inflight_infer, connections.busy),
        )
        await connections.wait_closed(deadline, busy=lambda: app.inflight_infer > 0)
        remaining = app.inflight_infer
        if remaining:
            log.warning("Gave up on %d request(s) at the end of the grace period", remaining)
            app.fail_remaining("the server shut down before this request finished")
            await asyncio.sleep(0)
        connections.close_all()
        connections.stop()
        app.stop()
        if app.batcher is not None:
            app.batcher.stop()
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        log.info("Drained in %.2f s; exited", time.monotonic() - started)
        return 0


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def apply_event_loop_policy(use_uvloop: bool) -> None:
    if not use_uvloop:
        return
    try:
        import uvloop
    except ImportError:
        log.warning("Did not find uvloop; used the standard asyncio event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_server(config: ServerConfig, loader: Loader | None = None) -> int:
    """Run a server in this (main) thread until it has drained; returns the exit code."""
    # numpy warns when a client's number overflows the input datatype; oip rejects that input with a 400.
    warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning)
    apply_event_loop_policy(config.uvloop)
    server = Server(config, loader)
    return asyncio.run(server.run(install_signals=True, freeze_gc=True))


class ServerThread:
    """A server on its own event loop in a background thread (tests and embedding)."""

    def __init__(self, config: ServerConfig, loader: Loader | None = None) -> None:
        self.server = Server(config, loader)
        self._thread = threading.Thread(target=self._run, name="shipyard-server", daemon=True)
        self.exit_code: int | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.exit_code = asyncio.run(self.server.run())
        except BaseException as error:
            self.error = error
            self.server.started.set()

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        if not self.server.started.wait(timeout) or self.error is not None:
            raise RuntimeError(f"the server did not start: {self.error}")
        return self

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def app(self) -> App:
        return self.server.app

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.app.ready:
                return
            if not self._thread.is_alive():
                raise RuntimeError(f"the server exited with {self.exit_code}: {self.error}")
            time.sleep(0.01)
        raise TimeoutError("the server did not become ready")

    def stop(self, timeout: float = 30.0) -> int | None:
        self.server.request_drain()
        self._thread.join(timeout)
        return self.exit_code


def main(argv: list[str]) -> int:
    """Entry point of `shipyard-runtime serve`."""
    try:
        config = build_config(argv, os.environ)
    except ConfigError as error:
        print(f"{contract.RUNTIME_COMMAND} {contract.SERVE_SUBCOMMAND}: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return run_server(config)
