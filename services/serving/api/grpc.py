"""The Open Inference Protocol v2 over gRPC: a ``grpc.aio`` server for ``inference.GRPCInferenceService``.

Thin, like the HTTP routers: every call checks the token (metadata ``authorization: Bearer
<token>`` or ``x-api-token``; any valid token, health calls included), then calls the codec
(:mod:`services.serving.protocols.v2_grpc`) and the data plane. ModelInfer awaits the data plane's
:func:`~services.serving.core.dataplane.infer`, as every protocol's route does: its requests are
merged with the other protocols' by the version's batcher, which runs calls too costly for the
event loop in the predict pool. Errors become gRPC status codes in one place,
:func:`services.serving.protocols.v2_grpc.error_status`.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer;
every other method of the service answers UNIMPLEMENTED saying so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from services.serving.core.dataplane import (
    DataPlane,
    count_error,
    infer,
    new_request_id,
    resolve,
    served_model,
)
from services.serving.protocols import v2_grpc
from services.serving.settings import ServingSettings
from shipyard_common.auth import Role, TokenAuthenticator
from shipyard_common.errors import InvalidInput, ShipyardError
from shipyard_common.metrics import HttpMetrics

log = logging.getLogger("shipyard.serving")

SERVICE = "inference.GRPCInferenceService"
#: On shutdown, calls in flight get this long to finish before they are cancelled.
STOP_GRACE_S = 5.0

Handler = Callable[[Any, Any], Awaitable[Any]]


class InferenceServicer:
    """The implemented methods of ``inference.GRPCInferenceService``; see the module docstring."""

    def __init__(
        self, *, dataplane: DataPlane, authenticator: TokenAuthenticator, ready: Callable[[], bool],
        version: str, http_metrics: HttpMetrics | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.authenticator = authenticator
        self.ready = ready
        self.version = version
        #: The service's request metrics: each call counts as ``POST /<service>/<method>`` (gRPC's
        #: HTTP/2 request) with the status an HTTP route would answer, so dashboards see it too.
        self.http_metrics = http_metrics

    def methods(self) -> dict[str, Handler]:
        """The implemented RPCs by name, each behind the token check and the error mapping."""
        own: dict[str, Handler] = {
            "ServerLive": self.server_live, "ServerReady": self.server_ready,
            "ModelReady": self.model_ready, "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata, "ModelInfer": self.model_infer,
        }
        return {name: self._guarded(name, method) for name, method in own.items()}

    def _guarded(self, name: str, method: Handler) -> Handler:
        route = f"/{SERVICE}/{name}"

        async def call(request: Any, context: Any) -> Any:
            started, status = time.perf_counter(), 500
            try:
                self._authorize(context)
                answer = await method(request, context)
                status = 200
                return answer
            except ShipyardError as exc:
                status = exc.status_code
                code, details = v2_grpc.error_status(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.error("gRPC request failed: %s", details)
                await context.abort(code, details)
            except Exception as exc:
                log.exception("unhandled error in a gRPC call", exc_info=exc)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
            finally:
                if self.http_metrics is not None:
                    self.http_metrics.observe("POST", route, status, time.perf_counter() - started)

        return call

    def _authorize(self, context: Any) -> None:
        """Any valid token (role viewer), as the HTTP routes check it; raises Unauthorized."""
        metadata = dict(context.invocation_metadata() or ())
        self.authenticator.authorize(metadata.get("authorization"), metadata.get("x-api-token"), Role.VIEWER)

    async def server_live(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.ready())

    async def model_ready(self, request: Any, context: Any) -> Any:
        try:
            resolve(self.dataplane, request.name, version=request.version or None)
        except ShipyardError:  # not served, or not that version: not ready, as Triton answers
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, request: Any, context: Any) -> Any:
        return v2_grpc.server_metadata(self.version)

    async def model_metadata(self, request: Any, context: Any) -> Any:
        return v2_grpc.model_metadata(resolve(self.dataplane, request.name, version=request.version or None))

    async def model_infer(self, request: Any, context: Any) -> Any:
        """One ``ModelInfer``: find the version (canary split when none is named), decode, run, encode."""
        started = time.perf_counter()
        name = request.model_name
        served = served_model(self.dataplane, name, version=request.model_version or None)
        try:
            arrays = v2_grpc.decode_inputs(request)
            requested = v2_grpc.requested_outputs(request, served)
        except InvalidInput:
            count_error(self.dataplane, name, "invalid_input")
            raise
        metadata = dict(context.invocation_metadata() or ())
        request_id = request.id or metadata.get("x-request-id") or new_request_id()
        inference = await infer(self.dataplane, served=served, inputs=dict(arrays), request_id=request_id,
                                started=started)
        return v2_grpc.encode_infer_response(inference, requested, request_id)


def _unimplemented(name: str) -> Handler:
    message = (
        f"{SERVICE}/{name} is not implemented by Shipyard serving; it implements ServerLive, "
        "ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer"
    )

    async def call(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return call


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
}


def service_handler(servicer: InferenceServicer) -> Any:
    """A generic handler for every method of the service, from its descriptor in tritonclient's stubs."""
    implemented = servicer.methods()
    handlers: dict[str, Any] = {}
    for method in pb.DESCRIPTOR.services_by_name[SERVICE.rsplit(".", 1)[1]].methods:
        if method.name in implemented:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                implemented[method.name],
                request_deserializer=getattr(pb, method.input_type.name).FromString,
                response_serializer=getattr(pb, method.output_type.name).SerializeToString,
            )
            continue
        # No (de)serializers: the messages pass as bytes, never read.
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(_unimplemented(method.name))
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def start_server(
    settings: ServingSettings, *, dataplane: DataPlane, authenticator: TokenAuthenticator,
    ready: Callable[[], bool], version: str, http_metrics: HttpMetrics | None = None,
) -> Any:
    """A started ``grpc.aio`` server on ``settings.host``:``settings.grpc_port``, on the running loop.

    Requests over ``max_body_bytes`` are refused by gRPC itself (RESOURCE_EXHAUSTED). With several
    worker processes each binds the port with SO_REUSEPORT (the kernel spreads connections over
    them, as uvicorn's workers share the HTTP socket); with one, a port in use fails the start.
    """
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ])
    servicer = InferenceServicer(dataplane=dataplane, authenticator=authenticator,
                                 ready=ready, version=version, http_metrics=http_metrics)
    server.add_generic_rpc_handlers((service_handler(servicer),))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    try:
        server.add_insecure_port(f"{host}:{settings.grpc_port}")
    except RuntimeError as exc:
        raise RuntimeError(
            f"the gRPC port {host}:{settings.grpc_port} cannot be bound ({exc}); is it in use? "
            "Set SHIPYARD_SERVING_GRPC_PORT to another port, or 0 to turn gRPC off"
        ) from exc
    await server.start()
    log.info("gRPC inference (Open Inference Protocol v2) on %s:%d", host, settings.grpc_port)
    return server


async def stop_server(server: Any, grace_s: float = STOP_GRACE_S) -> None:
    """Stop accepting calls; those in flight get ``grace_s`` seconds to finish."""
    await server.stop(grace_s)
