"""`shipyard-activator`: holds a scaled-to-zero model's requests until a model pod is Ready, then forwards them.

    shipyard-activator --upstream http://digits.ml.svc:8080 --model digits

The operator runs one small activator Deployment per ModelDeployment that may scale to zero (autoscaling
``minReplicas: 0``, docs/autoscaling.md). While the model has no pod, the operator points the model's Service at the
activator: requests reach it, it holds them and exports how many (``shipyard_activator_pending_requests``), KEDA reads
that gauge and scales the model 0 -> 1, and once a model pod is Ready the operator points the Service back at the
model pods. The activator notices (below) and forwards what it holds to the same Service, now reaching the model, and
streams the answers back. Nothing here knows about Kubernetes: no API client, no RBAC; the Service's selector is the
only switch, and the operator flips it.

Why a separate process rather than the gateway: Shipyard owns no gateway (clients reach a model through its Service,
behind whatever ingress, mesh or gateway a cluster has, or none), and a shared interceptor would sit in every
request's path even while the model is up. A per-model activator is only in the path while the model is at zero:
after the switch new connections go straight to the model pods; the activator stays a plain reverse proxy only for
clients whose kept-alive connections still land on it. Its failure is one model's, and it is stateless.

Why "switched" means a 200 *without* the ``x-shipyard-activator`` header: the activator knows the model only by the
Service's address, and while the Service still selects activators that address reaches an activator (this one or
another replica), which answers every path. Each answer an activator produces carries the header, and a request
carrying ``x-shipyard-activator-hop`` (sent by an activator: probes and forwarded requests) is answered 503 at once,
never held, so requests cannot loop. A ready answer without the header therefore came from a model pod, and the
operator switches the selector only once one is Ready. One shared probe runs while requests are held (a fresh
connection each time, as the Service's backends change under it). A forwarded request that still reaches an
activator, or whose connection fails before any answer byte, sends the activator back to "not switched" and the
request back to waiting; once the upstream began answering, a request is never sent again.

On timeout (``--hold-timeout`` from arrival, shortened to the drain on SIGTERM) the client gets 503 with
``Retry-After: 1`` and a JSON body naming the model and the wait; the request never reached the model, so any client
may send it again, even a POST. Over ``--max-pending`` held requests the activator answers 503 at once; a body over
``--max-body-bytes``, 413.

Every flag can also be set by the environment variable ``SHIPYARD_ACTIVATOR_<FLAG>`` (``--hold-timeout`` ->
``SHIPYARD_ACTIVATOR_HOLD_TIMEOUT``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp
import prometheus_client
import yarl
from aiohttp import web
from multidict import CIMultiDict

from shipyard import contract

log = logging.getLogger("shipyard.activator")

ENV_PREFIX: Final = "SHIPYARD_ACTIVATOR_"
METRIC_SWITCHED: Final = "shipyard_activator_switched"
OUTCOMES: Final = ("forwarded", "timeout", "rejected", "upstream_error", "cancelled")
HOLD_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300)
CONNECT_TIMEOUT: Final = 5.0  # a forwarded request's TCP connect; past it the request goes back to waiting
KEEPALIVE_SECONDS: Final = 4.0  # pooled connections to the model: below common servers' idle timeouts (uvicorn's 5 s)
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")

# Hop-by-hop headers (RFC 9110 7.6.1) and Host: never forwarded in either direction. Proxy-* go too (by prefix).
HOP_BY_HOP: Final = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"})
# ...and, on requests only: aiohttp sets Content-Length from the buffered body; the activator answered Expect itself.
REQUEST_ONLY: Final = frozenset({"content-length", "expect"})


# --- pure decisions -------------------------------------------------------------------------------------------------

def _dropped(headers: Mapping[str, str], extra: frozenset[str]) -> set[str]:
    """Lower-case names not to pass on: hop-by-hop, Proxy-*, those that Connection names, and ``extra``."""
    named = {token.strip().lower() for name, value in headers.items() if name.lower() == "connection"
             for token in value.split(",") if token.strip()}
    return {name.lower() for name in headers
            if name.lower() in HOP_BY_HOP or name.lower() in extra or name.lower() in named
            or name.lower().startswith("proxy-")}


def forward_request_headers(headers: Mapping[str, str], pod_name: str) -> CIMultiDict[str]:
    """The headers of a request forwarded upstream: the client's (repeated ones kept) less hop-by-hop ones, Host,
    Content-Length and Expect, plus the hop header naming this activator. Pure."""
    dropped = _dropped(headers, REQUEST_ONLY | {contract.ACTIVATOR_HOP_HEADER})
    out: CIMultiDict[str] = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in dropped)
    out[contract.ACTIVATOR_HOP_HEADER] = pod_name
    return out


def forward_response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The headers of an upstream answer passed to the client: less hop-by-hop ones (aiohttp frames the body itself:
    chunked when there is no Content-Length). Content-Length and Content-Encoding stay: the forwarding session does not
    decompress, so the bytes relayed are the bytes they describe. Pure."""
    dropped = _dropped(headers, frozenset())
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in dropped)


def reached_activator(headers: Iterable[str]) -> bool:
    """Whether an answer (its header names) came from an activator rather than from a model pod. Pure."""
    return any(name.lower() == contract.ACTIVATOR_HEADER for name in headers)


def upstream_switched(status: int, headers: Iterable[str]) -> bool:
    """The probe's verdict: the Service reaches model pods when the ready path answered 200 and no activator answered
    it. Pure."""
    return status == 200 and not reached_activator(headers)


def upstream_url(upstream: str, raw_path: str) -> str:
    """The upstream URL of a request: ``--upstream`` (any path prefix kept) + the request's raw path and query, as the
    client encoded them. Pure."""
    if not raw_path.startswith("/"):  # absolute-form request target (as sent to a proxy)
        raw_path = yarl.URL(raw_path).raw_path_qs
    return upstream.rstrip("/") + raw_path


def error_body(message: str) -> bytes:
    """The JSON body of every answer the activator produces itself. Pure."""
    return json.dumps({"error": message}).encode()


def seconds_text(seconds: float) -> str:
    """``120`` for 120.0004, ``0.3`` for 0.31. Pure."""
    return f"{round(seconds, 1):g}"


def timeout_message(model: str, waited: float, *, stopping: bool = False) -> str:
    why = "the activator held the request and is stopping" if stopping else "the activator held the request"
    return f"model {model} has no ready pod after {seconds_text(waited)} s (scaled to zero; {why})"


def full_message(model: str, pending: int) -> str:
    return (f"model {model} is scaled to zero and its activator already holds {pending} requests "
            "(--max-pending); try again shortly")


def loop_message(model: str) -> str:
    return (f"the request came back to an activator ({contract.ACTIVATOR_HOP_HEADER} set): the Service of model "
            f"{model} still reaches activators, not model pods")


def too_large_message(limit: int) -> str:
    return f"request body over {limit} bytes (the activator holds at most --max-body-bytes)"


@dataclass(frozen=True)
class Settings:
    upstream: str
    model: str
    port: int = 8080
    metrics_port: int = contract.ACTIVATOR_METRICS_PORT
    address: str = "0.0.0.0"
    ready_path: str = "/v2/health/ready"
    hold_timeout: float = 120.0
    max_pending: int = 1000
    max_body_bytes: int = 64 * 1024 * 1024
    probe_interval: float = 0.25
    drain_timeout: float = 25.0
    pod_name: str = "activator"
    log_level: str = "INFO"


def env_name(flag: str) -> str:
    """``--hold-timeout`` -> ``SHIPYARD_ACTIVATOR_HOLD_TIMEOUT``. Pure."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return value


def _url(text: str) -> str:
    try:
        url = yarl.URL(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a URL: {text!r}") from exc
    if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        raise argparse.ArgumentTypeError(f"not an http(s) URL without query: {text!r}")
    return text.rstrip("/")


def _path(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"must start with '/': {text!r}")
    return text


def build_parser(env: Mapping[str, str], hostname: str) -> argparse.ArgumentParser:
    """The CLI; each flag's default comes from its ``SHIPYARD_ACTIVATOR_*`` variable in ``env`` (argparse checks it
    as it checks the flag). Pure."""
    parser = argparse.ArgumentParser(prog="shipyard-activator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings(upstream="", model="")

    def default(flag: str, fallback: object) -> str | None:
        value = env.get(env_name(flag))
        return value if value is not None else (None if fallback is None else str(fallback))

    def env_help(flag: str, text: str) -> str:
        return f"{text} (env {env_name(flag)})"

    for flag, text in (("--upstream", "the model's Service, e.g. http://digits.ml.svc:8080"),
                       ("--model", "the ModelDeployment's name (the metrics' model label, the error messages)")):
        parser.add_argument(flag, default=default(flag, None), required=default(flag, None) is None,
                            type=_url if flag == "--upstream" else str, help=env_help(flag, text))
    parser.add_argument("--port", type=_port, default=default("--port", d.port),
                        help=env_help("--port", "serving port: every method and path"))
    parser.add_argument("--metrics-port", type=_port, default=default("--metrics-port", d.metrics_port),
                        help=env_help("--metrics-port", "port of /metrics and /healthz"))
    parser.add_argument("--address", default=default("--address", d.address),
                        help=env_help("--address", "listen address of both ports"))
    parser.add_argument("--ready-path", type=_path, default=default("--ready-path", d.ready_path),
                        help=env_help("--ready-path", "the model's readiness path, probed on --upstream"))
    parser.add_argument("--hold-timeout", type=_positive_float, default=default("--hold-timeout", d.hold_timeout),
                        help=env_help("--hold-timeout", "seconds a request is held at most, from its arrival; then "
                                                        "503 with Retry-After"))
    parser.add_argument("--max-pending", type=_positive_int, default=default("--max-pending", d.max_pending),
                        help=env_help("--max-pending", "requests held at most; beyond, 503 at once"))
    parser.add_argument("--max-body-bytes", type=_positive_int,
                        default=default("--max-body-bytes", d.max_body_bytes),
                        help=env_help("--max-body-bytes", "largest request body held or forwarded; beyond, 413"))
    parser.add_argument("--probe-interval", type=_positive_float,
                        default=default("--probe-interval", d.probe_interval),
                        help=env_help("--probe-interval", "seconds between two probes of the ready path on "
                                                          "--upstream while requests are held"))
    parser.add_argument("--drain-timeout", type=_positive_float, default=default("--drain-timeout", d.drain_timeout),
                        help=env_help("--drain-timeout", "on SIGTERM/SIGINT: seconds to finish held and in-flight "
                                                         "requests before exiting (held ones get 503 a second "
                                                         "before); keep terminationGracePeriodSeconds above it"))
    parser.add_argument("--pod-name", default=default("--pod-name", env.get("POD_NAME") or hostname),
                        help=env_help("--pod-name", "this activator's name in the x-shipyard-activator and "
                                                    "x-shipyard-activator-hop headers (default: $POD_NAME, else "
                                                    "the hostname)"))
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default("--log-level", d.log_level),
                        help=env_help("--log-level", "logging level"))
    return parser


def parse_args(argv: Sequence[str] | None, env: Mapping[str, str], hostname: str) -> Settings:
    """Settings from flags, else ``SHIPYARD_ACTIVATOR_*`` in ``env``, else defaults. Pure (exits on bad input, as
    argparse does)."""
    ns = build_parser(env, hostname).parse_args(argv)
    return Settings(upstream=ns.upstream, model=ns.model, port=ns.port, metrics_port=ns.metrics_port,
                    address=ns.address, ready_path=ns.ready_path, hold_timeout=ns.hold_timeout,
                    max_pending=ns.max_pending, max_body_bytes=ns.max_body_bytes, probe_interval=ns.probe_interval,
                    drain_timeout=ns.drain_timeout, pod_name=ns.pod_name, log_level=ns.log_level)


# --- the server -----------------------------------------------------------------------------------------------------

class Activator:
    """The serving and metrics servers, the forwarding session and the shared probe of one model (does I/O)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = prometheus_client.CollectorRegistry()
        model = settings.model
        self._pending = prometheus_client.Gauge(
            contract.METRIC_ACTIVATOR_PENDING, "Requests held while the model has no ready pod (KEDA scales on it).",
            [contract.LABEL_MODEL], registry=self.registry).labels(model)
        self._requests = prometheus_client.Counter(
            contract.METRIC_ACTIVATOR_REQUESTS,
            "Requests by outcome: forwarded, timeout (held past --hold-timeout), rejected (over --max-pending, "
            "too large, or looped back from an activator), upstream_error (the upstream failed mid-answer or "
            "answered garbage), cancelled (the client went away before its answer was complete).",
            [contract.LABEL_MODEL, "outcome"], registry=self.registry)
        self._outcomes = {outcome: self._requests.labels(model, outcome) for outcome in OUTCOMES}
        self._hold_seconds = prometheus_client.Histogram(
            contract.METRIC_ACTIVATOR_HOLD, "From a held request's arrival to its forwarding.",
            [contract.LABEL_MODEL], buckets=HOLD_BUCKETS, registry=self.registry).labels(model)
        self._switched_metric = prometheus_client.Gauge(
            METRIC_SWITCHED, "1 while the upstream Service is known to reach model pods, else 0.",
            [contract.LABEL_MODEL], registry=self.registry).labels(model)
        self._probe_url = yarl.URL(settings.upstream + settings.ready_path, encoded=True)
        self._probe_timeout = max(1.0, 4 * settings.probe_interval)
        self._switched = False
        self._waiting = 0  # requests held now (the gauge's value)
        self._changed = asyncio.Event()  # set (and replaced) when _switched changes or the activator stops
        self._stop_at = math.inf  # loop time past which held requests are answered 503 (set on stop)
        self._last_probe = -math.inf
        self._probe_task: asyncio.Task[None] | None = None
        self._timeouts_unlogged = 0
        self._timeout_log: asyncio.TimerHandle | None = None
        self._session: aiohttp.ClientSession | None = None
        self._probe_session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.port = settings.port
        self.metrics_port = settings.metrics_port

    @property
    def switched(self) -> bool:
        return self._switched

    async def start(self) -> None:
        settings = self.settings
        # Forwarding: one pool; bodies relayed as they are (no decompression), and no header the client did not send
        # (Accept-Encoding especially: the client would get an encoding it did not ask for).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT), auto_decompress=False,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"))
        # Probes: a fresh connection each, so that each one sees the Service's backends of the moment.
        self._probe_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that goes away while held stops being counted as pending
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=settings.drain_timeout)
        await self._runner.setup()
        await web.TCPSite(self._runner, settings.address, settings.port).start()
        self.port = self._runner.addresses[0][1]
        metrics = web.Application()
        metrics.router.add_get("/metrics", self._metrics)
        metrics.router.add_get("/healthz", self._healthz)
        self._metrics_runner = web.AppRunner(metrics, access_log=None, shutdown_timeout=1.0)
        await self._metrics_runner.setup()
        await web.TCPSite(self._metrics_runner, settings.address, settings.metrics_port).start()
        self.metrics_port = self._metrics_runner.addresses[0][1]
        log.info("activator %s for model %s: serving on %s:%d, metrics on %s:%d; upstream %s, ready path %s, "
                 "hold timeout %s s, max pending %d, max body %d bytes, probe every %s s, drain %s s",
                 settings.pod_name, settings.model, settings.address, self.port, settings.address, self.metrics_port,
                 settings.upstream, settings.ready_path, seconds_text(settings.hold_timeout), settings.max_pending,
                 settings.max_body_bytes, settings.probe_interval, seconds_text(settings.drain_timeout))

    async def stop(self) -> None:
        """Stops accepting, lets held and in-flight requests finish for at most ``--drain-timeout`` (held ones are
        answered 503 a second before it ends), then closes everything."""
        loop = asyncio.get_running_loop()
        self._stop_at = loop.time() + max(0.0, self.settings.drain_timeout - 1.0)
        log.info("stopping: %d held requests, at most %s s", self._waiting, seconds_text(self.settings.drain_timeout))
        self._wake()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        self._flush_timeouts()
        for session in (self._session, self._probe_session):
            if session is not None:
                await session.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        log.info("stopped")

    # --- state ---

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_switched(self, switched: bool, why: str) -> None:
        if switched == self._switched:
            return
        self._switched = switched
        self._switched_metric.set(1 if switched else 0)
        if switched:
            log.info("upstream reaches model pods (%s); forwarding %d held requests", why, self._waiting)
        else:
            log.info("upstream back to activators (%s); holding requests", why)
        self._wake()

    def _ensure_probe(self) -> None:
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.probe_interval
        while not self._switched and self._waiting > 0:
            delay = self._last_probe + interval - loop.time()
            if delay > 0:  # at most one probe per interval, across probe loops too (no hot loop after a bounce)
                await asyncio.sleep(delay)
                continue
            self._last_probe = loop.time()
            if await self._probe():
                self._set_switched(True, f"{self.settings.ready_path} answered 200 from a model pod")

    async def _probe(self) -> bool:
        assert self._probe_session is not None
        try:
            async with self._probe_session.get(
                    self._probe_url, headers={contract.ACTIVATOR_HOP_HEADER: self.settings.pod_name},
                    allow_redirects=False, timeout=aiohttp.ClientTimeout(total=self._probe_timeout)) as answer:
                return upstream_switched(answer.status, answer.headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("probe of %s: %s", self._probe_url, type(exc).__name__)
            return False

    async def _hold(self, deadline: float) -> bool:
        """Waits until switched (True) or past the deadline (False); counted in the pending gauge meanwhile."""
        loop = asyncio.get_running_loop()
        self._waiting += 1
        self._pending.inc()
        try:
            while not self._switched:
                self._ensure_probe()
                limit = min(deadline, self._stop_at)
                if loop.time() >= limit:
                    return False
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(limit):
                        await changed.wait()
            return True
        finally:
            self._waiting -= 1
            self._pending.dec()

    def _note_timeout(self) -> None:
        """Timeouts are logged at most once a second, with their count (a burst would be one line per request)."""
        self._timeouts_unlogged += 1
        if self._timeout_log is None:
            self._timeout_log = asyncio.get_running_loop().call_later(1.0, self._flush_timeouts)

    def _flush_timeouts(self) -> None:
        if self._timeout_log is not None:
            self._timeout_log.cancel()
            self._timeout_log = None
        if self._timeouts_unlogged:
            log.warning("%d held requests timed out: model %s has no ready pod (503 after at most %s s)",
                        self._timeouts_unlogged, self.settings.model, seconds_text(self.settings.hold_timeout))
            self._timeouts_unlogged = 0

    # --- HTTP ---

    def _answer(self, status: int, message: str, *, retry_after: bool = False) -> web.Response:
        headers = {contract.ACTIVATOR_HEADER: self.settings.pod_name, "Content-Type": "application/json"}
        if retry_after:
            headers["Retry-After"] = "1"
        return web.Response(status=status, body=error_body(message), headers=headers)

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The whole body, or None when it is over --max-body-bytes."""
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        settings = self.settings
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        outcome: str | None = None
        try:
            if contract.ACTIVATOR_HOP_HEADER in request.headers:
                outcome = "rejected"
                looped = self._answer(503, loop_message(settings.model))
                looped.force_close()  # so that the sender's pooled connection to an activator goes
                return looped
            body = await self._read_body(request)
            if body is None:
                outcome = "rejected"
                too_large = self._answer(413, too_large_message(settings.max_body_bytes))
                too_large.force_close()  # the rest of the body is not read
                return too_large
            deadline = arrival + settings.hold_timeout
            held = False
            while True:
                if not self._switched:
                    if not held and self._waiting >= settings.max_pending:
                        outcome = "rejected"
                        return self._answer(503, full_message(settings.model, self._waiting), retry_after=True)
                    held = True
                    if not await self._hold(deadline):
                        outcome = "timeout"
                        self._note_timeout()
                        return self._answer(503, timeout_message(settings.model, loop.time() - arrival,
                                                                 stopping=loop.time() >= self._stop_at),
                                            retry_after=True)
                forwarded = await self._forward(request, body, arrival if held else None)
                if forwarded is not None:
                    response, outcome = forwarded
                    return response
        finally:
            self._outcomes[outcome or "cancelled"].inc()

    async def _forward(self, request: web.Request, body: bytes,
                       held_since: float | None) -> tuple[web.StreamResponse, str] | None:
        """Sends the request upstream and relays the answer: (response, outcome), or None when it reached an activator
        or failed before any answer byte (then the activator is not switched, and the request waits again)."""
        assert self._session is not None
        sent = asyncio.get_running_loop().time()
        url = yarl.URL(upstream_url(self.settings.upstream, request.raw_path), encoded=True)
        answered = False
        try:
            async with self._session.request(
                    request.method, url, headers=forward_request_headers(request.headers, self.settings.pod_name),
                    data=body or None, allow_redirects=False) as upstream:
                answered = True
                if reached_activator(upstream.headers):
                    upstream.close()  # not back to the pool: that connection reaches an activator
                    self._set_switched(False, "a forwarded request reached an activator")
                    return None
                if held_since is not None:
                    self._hold_seconds.observe(sent - held_since)
                return await self._relay(request, upstream)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            if answered:  # the client's side (it went away) or ours, after the upstream answered: no retry
                raise
            self._set_switched(False, f"forwarding failed before an answer: {type(exc).__name__}")
            return None
        except aiohttp.ClientResponseError as exc:  # the upstream answered something that is not HTTP
            if answered:
                raise
            log.warning("model %s: bad answer to %s %s: %s", self.settings.model, request.method, request.path,
                        exc.message)
            return self._answer(502, f"model {self.settings.model}: bad answer from upstream"), "upstream_error"

    async def _relay(self, request: web.Request,
                     upstream: aiohttp.ClientResponse) -> tuple[web.StreamResponse, str]:
        """Streams the upstream's answer to the client chunk by chunk as it arrives. When the upstream fails
        mid-answer the client's connection is closed, so that it sees a truncated answer rather than a complete one."""
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=forward_response_headers(upstream.headers))
        try:
            await response.prepare(request)
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("model %s: upstream failed mid-answer to %s %s: %s", self.settings.model,
                                request.method, request.path, type(exc).__name__)
                    if request.transport is not None:
                        request.transport.close()
                    return response, "upstream_error"
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:  # the client went away mid-answer (closing the upstream's answer stops the model)
            return response, "cancelled"
        return response, "forwarded"

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=prometheus_client.generate_latest(self.registry),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")


async def serve(settings: Settings) -> None:
    """Runs the activator until SIGTERM or SIGINT, then drains it."""
    activator = Activator(settings)
    await activator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await activator.stop()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv, os.environ, socket.gethostname())
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
