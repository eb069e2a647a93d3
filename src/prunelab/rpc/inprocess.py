"""Embedded mode: call a servicer method in this process, without a socket.

The servicer is the very object a server would host; `call_in_process` gives it a
context that behaves like gRPC's and maps its errors with the interceptor's own
guards, so a failure raises an `InProcessRpcError` with the same `.code()`,
`.details()` and `error_detail()` a remote call's `grpc.RpcError` would have.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from prunelab.rpc.status import Metadata, RpcStatus, guard_stream, guard_unary

log = logging.getLogger(__name__)


class InProcessRpcError(grpc.RpcError):
    """How an in-process call fails: the client-side face of an `RpcStatus`."""

    def __init__(self, status: RpcStatus):
        super().__init__(f"{status.code.name}: {status.details}")
        self.status = status

    def code(self) -> grpc.StatusCode:
        return self.status.code

    def details(self) -> str:
        return self.status.details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.status.trailing_metadata

    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return ()


class InProcessContext(grpc.ServicerContext):
    """The part of `grpc.ServicerContext` servicers use, for one in-process call.

    There is no peer, no transport security and no deadline; `abort` raises
    `InProcessRpcError` straight to the caller."""

    def __init__(self, metadata: Metadata | None = None):
        self._metadata = tuple(metadata or ())
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._active = True

    # --- what the servicer reads

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return "in-process"

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def is_active(self) -> bool:
        return self._active

    def time_remaining(self) -> None:
        return None  # in-process calls have no deadline

    # --- how the servicer ends the call

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.abort_with_status(RpcStatus(code, details, self._trailing_metadata))

    def abort_with_status(self, status: grpc.Status) -> None:
        if status.code == grpc.StatusCode.OK:  # as gRPC does: aborting with OK is a bug
            status = RpcStatus(grpc.StatusCode.UNKNOWN, "", tuple(status.trailing_metadata or ()))
        self._code, self._details = status.code, status.details
        raise InProcessRpcError(RpcStatus(status.code, status.details, tuple(status.trailing_metadata or ())))

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailing_metadata = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing_metadata

    def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        pass  # nobody in-process reads initial metadata

    def set_compression(self, compression: grpc.Compression) -> None:
        pass  # nothing is sent over a wire

    def disable_next_message_compression(self) -> None:
        pass

    # --- lifecycle

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if not self._active:
                return False
            self._callbacks.append(callback)
            return True

    def cancel(self) -> None:
        self.terminate()

    def terminate(self) -> None:
        """End the call: `is_active()` turns False and the callbacks run, once."""
        with self._lock:
            if not self._active:
                return
            self._active = False
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("in-process call: termination callback failed")

    def raise_if_failed(self) -> None:
        """A servicer may fail a call with `set_code` and a normal return, as gRPC allows."""
        if self._code not in (None, grpc.StatusCode.OK):
            raise InProcessRpcError(RpcStatus(self._code, self._details, self._trailing_metadata))


def call_in_process(method: Callable[[Any, grpc.ServicerContext], Any], request: Any, metadata: Metadata | None = None) -> Any:
    """Call a servicer method as a server would: returns the response of a unary method,
    or an iterator over a streaming method's responses. Fails with `InProcessRpcError`.

    Closing the returned iterator early cancels the call like a client cancellation
    would: the context turns inactive and its callbacks run."""
    context = InProcessContext(metadata)
    name = getattr(method, "__qualname__", repr(method))
    try:
        result = guard_unary(method, name)(request, context)
    except BaseException:
        context.terminate()
        raise
    if not isinstance(result, Iterator):  # a unary method's response (or None after set_code)
        context.terminate()
        context.raise_if_failed()
        return result
    return _stream(guard_stream(lambda _request, _context: result, name)(request, context), context)


def _stream(responses: Iterator[Any], context: InProcessContext) -> Iterator[Any]:
    try:
        yield from responses
        context.raise_if_failed()
    finally:
        context.terminate()
