"""Domain errors. Library code raises these; `prunelab.rpc` maps each to one gRPC
status code and the CLI to a message and a non-zero exit, so neither has to guess."""

import errno


class PrunelabError(Exception):
    """Base of every error prunelab raises on purpose. `field` names the offending input."""

    grpc_code = "INTERNAL"

    def __init__(self, reason: str, *, field: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.field = field


class InvalidArgument(PrunelabError):
    """The request itself is wrong (bad ratio, unknown method, malformed URI)."""

    grpc_code = "INVALID_ARGUMENT"


class NotFound(PrunelabError):
    """A named thing (artifact, model, dataset) does not exist."""

    grpc_code = "NOT_FOUND"


class PermissionDenied(PrunelabError):
    """The caller may not make this service read what it named (a path outside the
    read roots, a hub id while offline); the message never says whether it exists."""

    grpc_code = "PERMISSION_DENIED"


class FailedPrecondition(PrunelabError):
    """The request is valid but the system is not in a state to serve it
    (dataset not imported while offline, corrupted artifact)."""

    grpc_code = "FAILED_PRECONDITION"


class ResourceExhausted(PrunelabError):
    """Too many concurrent jobs, out of memory."""

    grpc_code = "RESOURCE_EXHAUSTED"


class ReplicaBusy(ResourceExhausted):
    """A replica already runs as many jobs as it may: a later try, or another replica,
    takes the job. Callers tell it from other RESOURCE_EXHAUSTED failures (a message too
    large, memory) by its error type in the status details, never by the code alone."""


class DiskFull(ResourceExhausted):
    """A write failed because the file system is full: the job cannot finish on this
    machine until space is freed, so it is not retried."""


class Unavailable(PrunelabError):
    """A dependency (object store, another service) cannot be reached right now; retrying may help."""

    grpc_code = "UNAVAILABLE"


class IntegrityError(FailedPrecondition):
    """Stored bytes do not match their recorded sha256: never returned as valid."""


_BY_CODE = {
    cls.grpc_code: cls for cls in (InvalidArgument, NotFound, PermissionDenied, FailedPrecondition, ResourceExhausted, Unavailable)
}


def error_class(grpc_code: str) -> type[PrunelabError]:
    """The domain error of a gRPC status code's name (INVALID_ARGUMENT -> InvalidArgument),
    for failures that crossed a process boundary; PrunelabError for any other code."""
    return _BY_CODE.get(grpc_code, PrunelabError)


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# safetensors writes from Rust and reports the OS error in its message, not as an errno
_DISK_FULL_TEXT = tuple(f"(os error {code})" for code in _DISK_FULL_ERRNOS)


def as_domain_error(exc: BaseException) -> PrunelabError | None:
    """`exc` as the domain error it amounts to: itself if it is one, DiskFull for a write
    that failed on a full disk (also when raised while handling one), else None."""
    if isinstance(exc, PrunelabError):
        return exc
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if (isinstance(cause, OSError) and cause.errno in _DISK_FULL_ERRNOS) or any(text in str(cause) for text in _DISK_FULL_TEXT):
            return DiskFull(
                "no space left on the worker's disk while writing a file; free space in its scratch folder "
                "(TMPDIR) and cache (PRUNELAB_CACHE), then submit the job again"
            )
        cause = cause.__cause__ or cause.__context__
    return None
