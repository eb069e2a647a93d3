"""Exceptions to gRPC statuses, in one place for remote and in-process calls alike.

The status code of each domain error is the `grpc_code` its class declares in
`prunelab.errors`; that is the only mapping table (a bare `PrunelabError` is
INTERNAL, its reason still sent: it was raised on purpose). A write on a full disk is
DiskFull (RESOURCE_EXHAUSTED), whatever library raised it. Other unexpected exceptions
become INTERNAL with their traceback logged, never sent: tracebacks leak paths and
internals and help no caller.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from prunelab.access import remote_request
from prunelab.errors import as_domain_error
from prunelab.logs import current_job_id, job_context
from prunelab.v1.common_pb2 import ErrorDetail

log = logging.getLogger(__name__)

JOB_ID_METADATA_KEY = "x-prunelab-job-id"
# Keys ending in "-bin" carry bytes; gRPC base64-encodes them on the wire.
ERROR_DETAIL_METADATA_KEY = "prunelab-error-bin"

Metadata = Sequence[tuple[str, str | bytes]]
T = TypeVar("T")
_END = object()  # marks an exhausted response iterator without catching StopIteration


@dataclass(frozen=True)
class RpcStatus(grpc.Status):
    """A final status: what `context.abort_with_status` sends and `InProcessRpcError` holds."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


MAX_REASON_CHARS = 1000  # a reason quotes what was asked; a hostile request's input is not sent back whole


def clipped(reason: str) -> str:
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    return f"{reason[:MAX_REASON_CHARS]}... ({len(reason) - MAX_REASON_CHARS} more characters)"


def status_for(exc: BaseException, method: str) -> RpcStatus:
    """The status a call that raised `exc` ends with; logs the failure under the current job id."""
    if (domain := as_domain_error(exc)) is not None:
        code, reason = grpc.StatusCode[domain.grpc_code], clipped(domain.reason)
        detail = ErrorDetail(field=domain.field, error_type=type(domain).__name__)
        log.warning("%s failed: %s: %s", method, code.name, reason, exc_info=None if domain is exc else exc)
    else:
        job_id = current_job_id()
        ref = f"job id {job_id}" if job_id != "-" else f"error id {uuid.uuid4().hex[:12]}"
        code, reason = grpc.StatusCode.INTERNAL, f"internal error; see server log, {ref}"
        detail = ErrorDetail()
        log.error("%s failed with an unexpected error (%s)", method, ref, exc_info=exc)
    detail.code, detail.reason = code.name, reason
    return RpcStatus(code, reason, ((ERROR_DETAIL_METADATA_KEY, detail.SerializeToString()),))


def error_detail(rpc_error: grpc.RpcError) -> ErrorDetail | None:
    """The ErrorDetail a prunelab server attached to a failed call (remote or in-process), if any."""
    trailing = getattr(rpc_error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == ERROR_DETAIL_METADATA_KEY:
            return ErrorDetail.FromString(value)
    return None


def job_id_from(metadata: Metadata | None) -> str:
    """The job id a caller sent as request metadata, or "-" (logs' "no job") when none."""
    for key, value in metadata or ():
        if key == JOB_ID_METADATA_KEY and value:
            return value if isinstance(value, str) else value.decode()
    return "-"


def _run_step(step: Callable[[], T], context: grpc.ServicerContext, method: str) -> T:
    """Run one step of a handler; turn what it raises into the call's final status."""
    try:
        return step()
    except Exception as exc:
        if context.code() not in (None, grpc.StatusCode.OK):
            raise  # the handler aborted the call itself: its status stands
        context.abort_with_status(status_for(exc, method))
        raise  # not reached: abort_with_status raises to end the call


@contextlib.contextmanager
def _call_context(job_id: str, remote: bool) -> Iterator[None]:
    """The job id for logs and, for a call from another process, confinement (prunelab.access)."""
    with job_context(job_id), remote_request() if remote else contextlib.nullcontext():
        yield


def guard_unary(
    behavior: Callable[[Any, grpc.ServicerContext], T], method: str, *, remote: bool = False
) -> Callable[[Any, grpc.ServicerContext], T]:
    """`behavior` (request or request iterator → one response) with error mapping, under
    the call's job id; `remote`: the call came over a socket."""

    def guarded(request: Any, context: grpc.ServicerContext) -> T:
        with _call_context(job_id_from(context.invocation_metadata()), remote):
            return _run_step(lambda: behavior(request, context), context, method)

    return guarded


def guard_stream(
    behavior: Callable[[Any, grpc.ServicerContext], Iterator[T]], method: str, *, remote: bool = False
) -> Callable[[Any, grpc.ServicerContext], Iterator[T]]:
    """`behavior` (→ stream of responses) with error mapping. An error after some
    responses ends the stream with the mapped status; those responses were already sent.
    The job id is set only while the handler runs, never across a `yield`, so it
    cannot leak into whatever thread consumes the stream."""

    def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[T]:
        job_id = job_id_from(context.invocation_metadata())

        def step(fn: Callable[[], Any]) -> Any:
            with _call_context(job_id, remote):
                return _run_step(fn, context, method)

        responses = step(lambda: iter(behavior(request, context)))
        try:
            while (response := step(lambda: next(responses, _END))) is not _END:
                yield response
        finally:
            # A cancelled or abandoned call closes the handler's generator now, so its
            # cleanup (stopping the job) runs at once and logs under the job id.
            close = getattr(responses, "close", None)
            if close is not None:
                step(close)

    return guarded
