"""The one server interceptor: domain errors → status codes, job id → log context."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from prunelab.rpc.status import guard_stream, guard_unary

# Each kind of method handler: its constructor, and the guard for its behavior
# (by whether it answers with one response or a stream).
HANDLER_KINDS = {
    "unary_unary": (grpc.unary_unary_rpc_method_handler, guard_unary),
    "stream_unary": (grpc.stream_unary_rpc_method_handler, guard_unary),
    "unary_stream": (grpc.unary_stream_rpc_method_handler, guard_stream),
    "stream_stream": (grpc.stream_stream_rpc_method_handler, guard_stream),
}


class ErrorInterceptor(grpc.ServerInterceptor):
    """Wraps every prunelab handler so a raised `PrunelabError` ends the call with its
    status code (reason as details, `ErrorDetail` in trailing metadata) and anything
    else with INTERNAL, sets the job id from the `x-prunelab-job-id` metadata, and
    confines what the call may make this host read (prunelab.access).

    gRPC's own services (`grpc.health.v1`, `grpc.reflection.*`) are left untouched:
    they report their own statuses, and a wrapper would hide the health Watch
    handler's non-blocking calling convention, so that every watcher (load balancers,
    probes) would hold a worker thread for as long as it watches."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc."):
            return handler
        return _guarded(handler, method)


def _guarded(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    for kind, (make_handler, guard) in HANDLER_KINDS.items():
        behavior = getattr(handler, kind)
        if behavior is not None:
            return make_handler(guard(behavior, method, remote=True), handler.request_deserializer, handler.response_serializer)
    raise ValueError(f"{method}: method handler has no behavior")
