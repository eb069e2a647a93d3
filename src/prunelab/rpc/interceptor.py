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


class HandlerInterceptor(grpc.ServerInterceptor):
    """A server interceptor that may put another handler in place of each method's
    (`replace`); methods this server does not have pass through untouched."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        return handler if handler is None else self.replace(handler, handler_call_details)

    def replace(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        raise NotImplementedError


def rebuilt(handler: grpc.RpcMethodHandler, behavior_for: Callable[[str, Callable], Callable]) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and (de)serializers, its behavior `behavior_for(kind, behavior)`."""
    for kind, (make_handler, _guard) in HANDLER_KINDS.items():
        behavior = getattr(handler, kind)
        if behavior is not None:
            return make_handler(behavior_for(kind, behavior), handler.request_deserializer, handler.response_serializer)
    raise ValueError("method handler has no behavior")


class ErrorInterceptor(HandlerInterceptor):
    """Wraps every prunelab handler so a raised `PrunelabError` ends the call with its
    status code (reason as details, `ErrorDetail` in trailing metadata) and anything
    else with INTERNAL, sets the job id from the `x-prunelab-job-id` metadata, and
    confines what the call may make this host read (prunelab.access).

    gRPC's own services (`grpc.health.v1`, `grpc.reflection.*`) are left untouched:
    they report their own statuses, and a wrapper would hide the health Watch
    handler's non-blocking calling convention, so that every watcher (load balancers,
    probes) would hold a worker thread for as long as it watches."""

    def replace(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith("/grpc."):
            return handler
        return rebuilt(handler, lambda kind, behavior: HANDLER_KINDS[kind][1](behavior, method, remote=True))
