"""One running inference server and its process: listen, load, serve, drain.

I/O: it listens on a socket at once (liveness answers while the model loads), loads the artifact and warms it up
on every device in the background (readiness turns true only then), batches requests dynamically in front of one
worker thread per device (REST, and gRPC on its own port with --grpc-port, share the batcher), exports Prometheus
metrics on the REST port, and drains gracefully on SIGTERM:
readiness 503 first, a propagation window during which it keeps serving, then no new connections, in-flight
requests finish, exit within the grace period. `main` is `shipyard-runtime serve`.
"""

from __future__ import annotations

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
from typing import Any

from shipyard import contract
from shipyard.runtime import batching, httpproto, metrics
from shipyard.runtime.server import endpoints, loading, settings

log = logging.getLogger("shipyard.runtime.server")

EXIT_MARGIN_S = 1.0  # the server is gone this long before the grace period (kubelet's SIGKILL) ends


class Server:
    """One running server: socket, app, batcher, workers; `run` returns the exit code."""

    def __init__(self, config: settings.ServerConfig, loader: loading.Loader | None = None) -> None:
        self.config = config
        # the default loads the artifact (its compiled package per config.compiled); tests inject their own
        self.loader: loading.Loader = loader or functools.partial(loading.fetch_model, config=config)
        self.metrics = metrics.ServerMetrics(config.model_name, config.model_version)
        self.app = endpoints.App(config, self.metrics)
        self.connections = httpproto.Connections(config.keep_alive_timeout_s)
        self.port: int | None = None
        self.grpc_port: int | None = None  # with config.grpc_port: where the gRPC front end listens
        self._grpc: Any = None  # its grpc.aio.Server
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
        server: Any = _NoServer()
        if config.http:
            server = await loop.create_server(
                lambda: httpproto.Connection(app, connections, config.max_payload_bytes),
                config.host,
                config.port,
                reuse_address=True,
                backlog=2048,
            )
            self.port = server.sockets[0].getsockname()[1]
            log.info("Listened on %s:%d; liveness is up, readiness waits for the model", config.host, self.port)
        else:
            log.info("Did not listen for HTTP (--http off): the gRPC port alone serves, without /metrics")
        if config.grpc_port is not None:
            from shipyard.runtime.server import grpcservice  # grpcio only when gRPC is on

            self._grpc, self.grpc_port = await grpcservice.apply_grpc_server(app, config)
            log.info("Listened for gRPC (inference.GRPCInferenceService) on %s:%d", config.host, self.grpc_port)
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal)
        self.started.set()

        loaded: asyncio.Future[loading.LoadedWorkers] = loop.create_future()

        def on_done(worker: Any, jobs: list[batching.Job], results: list[Any]) -> None:
            assert self.app.batcher is not None
            self.app.batcher.on_batch_done(worker, jobs, results)

        def load() -> None:
            try:
                result = loading.apply_load(config, self.loader, loop, on_done)
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
            await self._stop_grpc(0)
            app.stop()
            connections.stop()
            return 0
        error = loaded.exception()
        if error is not None:
            log.error("Failed to load model %s from %s: %s", config.model_name, config.artifact, error)
            server.close()
            await self._stop_grpc(0)
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
            "Became ready: model %s version %s on %s, %d torch thread(s), batches up to %d rows (max batch %d), "
            "max delay %g ms",
            config.model_name,
            config.model_version,
            ",".join(result.devices),
            result.threads,
            result.batch_limit or config.max_batch_size,
            config.max_batch_size,
            config.max_delay_ms,
        )
        await stop_wait
        return await self._drain(server)

    def _start_serving(self, loop: asyncio.AbstractEventLoop, loaded: loading.LoadedWorkers) -> None:
        from shipyard.runtime import engine

        app = self.app
        self._workers = loaded.workers
        batcher = batching.Batcher(
            loop,
            self._workers,
            max_batch=loaded.batch_limit or self.config.max_batch_size,
            max_delay_s=self.config.max_delay_ms / 1000.0,
            max_queue=self.config.max_queue,
            on_result=app.on_result,
            on_batch_started=app.on_batch_started,
        )
        if any(device.startswith("cuda") for device in loaded.devices):
            devices = loaded.devices
            self.metrics.register_gpu(lambda: engine.fetch_gpu_stats(devices))
        self.metrics.queue_depth = lambda: batcher.queued
        app.set_serving(loaded.model.inputs, loaded.model.outputs, batcher, loaded.text)

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
        # gRPC: no new RPCs from now on; those in flight finish (counted in app.inflight_infer) until the deadline,
        # where fail_remaining answers them as it does HTTP's. grpcio's own grace ends a little later (within the
        # exit margin): ending first, it would cancel them itself.
        grpc_grace = max(0.0, deadline - time.monotonic()) + EXIT_MARGIN_S / 2
        grpc_stopped = asyncio.ensure_future(self._stop_grpc(grpc_grace))
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
        await grpc_stopped
        connections.close_all()
        connections.stop()
        app.stop()
        if app.batcher is not None:
            app.batcher.stop()
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        log.info("Drained in %.2f s; exited", time.monotonic() - started)
        return 0


    async def _stop_grpc(self, grace: float) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace)


class _NoServer:
    """Stands for the HTTP listener with --http off: nothing to close."""

    def close(self) -> None:
        pass


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


def run_server(config: settings.ServerConfig, loader: loading.Loader | None = None) -> int:
    """Run a server in this (main) thread until it has drained; returns the exit code."""
    # numpy warns when a client's number overflows the input datatype; oip rejects that input with a 400.
    warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning)
    apply_event_loop_policy(config.uvloop)
    server = Server(config, loader)
    return asyncio.run(server.run(install_signals=True, freeze_gc=True))


def main(argv: list[str]) -> int:
    """Entry point of `shipyard-runtime serve`."""
    try:
        config = settings.build_config(argv, os.environ)
    except settings.ConfigError as error:
        print(f"{contract.RUNTIME_COMMAND} {contract.SERVE_SUBCOMMAND}: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return run_server(config)
