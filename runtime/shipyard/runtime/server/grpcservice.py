"""The gRPC front end: `inference.GRPCInferenceService` (KServe V2 / Triton) on grpc.aio, beside the REST one.

I/O: listens on its own port (`--grpc-port`) on the server's event loop and answers ServerLive, ServerReady,
ModelReady, ServerMetadata, ModelMetadata and ModelInfer; the service's other methods (Triton's additions) answer
UNIMPLEMENTED, and a message that does not parse INVALID_ARGUMENT. Inference goes through the same `App` as REST
(`App.submit`): the same batcher and queue bound, per-request timeout, fault injection, readiness and drain;
requests are counted in the same metrics with protocol="grpc" and the HTTP status of the same outcome as `code`.
Messages over `--max-payload-bytes` are refused by grpcio with RESOURCE_EXHAUSTED before they are parsed. Tensors
are converted by `grpcproto` (pure); the messages are tritonclient's generated `service_pb2`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from tritonclient.grpc import service_pb2

from shipyard.runtime import batching, grpcproto, oip, textinput
from shipyard.runtime.server import endpoints, settings

log = logging.getLogger("shipyard.runtime.server")

CLIENT_CLOSED = 499  # the metrics' code for a request whose client cancelled it (nginx's convention)
SERVICE = "inference.GRPCInferenceService"


class Malformed:
    """A request message that does not parse: answered INVALID_ARGUMENT by its method (grpcio would answer
    INTERNAL, as for a server fault, had the deserializer raised)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def build_parser(message_type: Any) -> Any:
    def parse(raw: bytes) -> Any:
        try:
            return message_type.FromString(raw)
        except DecodeError as error:
            return Malformed(f"the request is not a valid {message_type.DESCRIPTOR.name}: {error}")

    return parse


class GrpcContext:
    """A gRPC inference request's place in the batcher: its answer resolves a future on the event loop."""

    __slots__ = ("future", "started")

    def __init__(self, future: asyncio.Future[batching.JobResult], started: float) -> None:
        self.future = future
        self.started = started

    def deliver(self, result: batching.JobResult) -> None:
        if not self.future.done():
            self.future.set_result(result)


class InferenceService:
    """The service's methods, answered from the App's state (everything on the server's event loop)."""

    def __init__(self, app: endpoints.App) -> None:
        self.app = app

    def build_handler(self) -> grpc.GenericRpcHandler:
        """The generic handler of the six methods served; grpcio answers UNIMPLEMENTED for the rest."""
        methods = {
            "ServerLive": (service_pb2.ServerLiveRequest, service_pb2.ServerLiveResponse),
            "ServerReady": (service_pb2.ServerReadyRequest, service_pb2.ServerReadyResponse),
            "ModelReady": (service_pb2.ModelReadyRequest, service_pb2.ModelReadyResponse),
            "ServerMetadata": (service_pb2.ServerMetadataRequest, service_pb2.ServerMetadataResponse),
            "ModelMetadata": (service_pb2.ModelMetadataRequest, service_pb2.ModelMetadataResponse),
            "ModelInfer": (service_pb2.ModelInferRequest, service_pb2.ModelInferResponse),
        }
        handlers = {}
        for name, (request_type, response_type) in methods.items():
            method = getattr(self, name)

            async def call(request: Any, context: aio.ServicerContext[Any, Any], method: Any = method) -> Any:
                if type(request) is Malformed:
                    if method == self.ModelInfer:  # counted, as a 400 would be on REST
                        self.app.metrics.observe_grpc_request(400, 0.0)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
                return await method(request, context)

            handlers[name] = grpc.unary_unary_rpc_method_handler(
                call,
                request_deserializer=build_parser(request_type),
                response_serializer=response_type.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    async def ServerLive(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=self.app.ready)

    async def ServerMetadata(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        return service_pb2.ServerMetadataResponse(name=endpoints.SERVER_NAME, version=endpoints.SERVER_VERSION)

    async def ModelReady(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        await self._check_model(request.name, request.version, context)
        return service_pb2.ModelReadyResponse(ready=self.app.ready)

    async def ModelMetadata(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        app = self.app
        await self._check_model(request.name, request.version, context)
        if app.batcher is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, app.not_ready_reason)
        return grpcproto.build_model_metadata_response(app.model_name, app.model_version, app.inputs, app.outputs)

    async def ModelInfer(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        app = self.app
        started = time.perf_counter()
        app.inflight_infer += 1
        app.metrics.inflight.inc()
        accounted = False

        def account(status: int) -> None:
            # counted before the answer leaves, as on REST: a client that reads the metrics next sees this request
            nonlocal accounted
            accounted = True
            app.metrics.observe_grpc_request(status, time.perf_counter() - started)
            app.metrics.inflight.dec()
            app.inflight_infer -= 1

        job: batching.Job | None = None
        try:
            try:
                text = app.text
                if text is None:
                    parsed = grpcproto.build_grpc_infer_request(request, app.inputs, app.outputs)
                elif textinput.plan_text_request([item.name for item in request.inputs], text.name):
                    parsed = text.convert(grpcproto.build_grpc_infer_request(request, text.text_specs, app.outputs))
                else:
                    parsed = grpcproto.build_grpc_infer_request(request, text.model_inputs, app.outputs)
                future: asyncio.Future[batching.JobResult] = asyncio.get_running_loop().create_future()
                job = app.submit(parsed, GrpcContext(future, started), request.model_name,
                                 request.model_version or None)
                result = await future
                job = None
                if isinstance(result, BaseException):
                    raise result
                if not isinstance(result, list):
                    raise oip.ModelFailure("no result")
                response = grpcproto.build_grpc_infer_response(
                    app.model_name, app.model_version, parsed.request_id, app.outputs, result, parsed.output_indices
                )
            except oip.ServingError as error:
                status = oip.build_error_status(error)
                await self._delay()
                account(status)
                await context.abort(grpcproto.build_grpc_code(status), str(error))
            except asyncio.CancelledError:
                account(CLIENT_CLOSED)
                raise
            except Exception as error:  # a bug: INTERNAL, and the server goes on
                log.exception("Failed to handle a gRPC inference request")
                account(500)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(error).__name__}")
            await self._delay()
            account(200)
            if app.shadow is not None and app.text is None:  # shadow traffic: a copy, never awaited
                app.shadow.offer_parsed(parsed, app.inputs, app.outputs, result, app.model_name, app.model_version)
            return response
        finally:
            if job is not None:  # cancelled while queued or running: its result is not wanted
                app.forget(job)
            if not accounted:  # cancelled during a delay
                account(CLIENT_CLOSED)

    async def _delay(self) -> None:
        delay = self.app.faults.config.extra_latency_s
        if delay > 0:
            await asyncio.sleep(delay)

    async def _check_model(self, name: str, version: str, context: aio.ServicerContext[Any, Any]) -> None:
        try:
            self.app.check_model(name, version or None)
        except oip.ServingError as error:
            await context.abort(grpcproto.build_grpc_code(oip.build_error_status(error)), str(error))


def add_health_service(server: aio.Server, app: endpoints.App) -> Any:
    """The standard `grpc.health.v1.Health` service (grpcio-health-checking) on the gRPC server: SERVING for the
    server as a whole ("") and for inference.GRPCInferenceService while the model is ready, NOT_SERVING while it
    loads and once it drains, so that a Kubernetes gRPC probe (`grpc: {port}`) follows readiness."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    status = health_pb2.HealthCheckResponse

    def follow(ready: bool) -> None:
        value = status.SERVING if ready else status.NOT_SERVING
        for service in ("", SERVICE):
            asyncio.ensure_future(servicer.set(service, value))

    follow(app.ready)
    app.readiness_listeners.append(follow)
    return servicer


async def apply_grpc_server(app: endpoints.App, config: settings.ServerConfig) -> tuple[aio.Server, int]:
    """Start the gRPC server on the running loop; returns it and the port it listens on."""
    assert config.grpc_port is not None
    limit = config.max_payload_bytes
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024)),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max(64, config.max_queue * 2),
    )
    server.add_generic_rpc_handlers((InferenceService(app).build_handler(),))
    add_health_service(server, app)
    host = config.host
    address = f"[{host}]:{config.grpc_port}" if ":" in host else f"{host}:{config.grpc_port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not listen for gRPC on {address}")
    app.metrics.enable_grpc()
    await server.start()
    return server, port
