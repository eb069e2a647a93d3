"""What a request may make this host read: everything for the CLI's embedded mode (the
user owns the machine), only what it is given for a service.

A request that arrived over a socket (`remote_request`, entered by the rpc layer for
every prunelab call) or any work of a service's main program (`confine_process`, so
the orchestrator's in-process jobs and the tuner's training processes are covered
too) is *confined*: it may name models and data as registered names, `artifact://`
URIs, stored datasets, files under the read roots (PRUNELAB_DATA_DIR and
PRUNELAB_READ_ROOTS, compared after resolving symlinks), and hub ids when the hub is
allowed (online, and from an allowed org when PRUNELAB_HUB_ORGS lists some). Anything
else is PERMISSION_DENIED, with a message that is the same whether the path exists or not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from prunelab.config import settings
from prunelab.errors import InvalidArgument, PermissionDenied

MAX_SPEC_CHARS = 4096  # PATH_MAX: longer is no path (and stat() would fail with ENAMETOOLONG)
# Set in a service's main program and inherited by the processes it starts.
CONFINED_ENV = "PRUNELAB_CONFINED"
_remote: ContextVar[bool] = ContextVar("prunelab_remote_request", default=False)


@contextlib.contextmanager
def remote_request() -> Iterator[None]:
    """The block serves a caller on another process: confined."""
    token = _remote.set(True)
    try:
        yield
    finally:
        _remote.reset(token)


def confine_process() -> None:
    """Confine everything this process and its children do (a service's main program)."""
    os.environ[CONFINED_ENV] = "1"


def confined() -> bool:
    return _remote.get() or os.environ.get(CONFINED_ENV) == "1"


def child_environment() -> dict[str, str]:
    """The environment for a process this one starts: confined if this work is."""
    return {**os.environ, CONFINED_ENV: "1"} if confined() else dict(os.environ)


def read_roots() -> list[Path]:
    """The folders a confined request may name files under, symlinks resolved."""
    cfg = settings()
    roots = [cfg.data_dir, *cfg.read_roots] if cfg.data_dir else list(cfg.read_roots)
    return [root.expanduser().resolve() for root in roots]


def local_path(spec: str, field: str) -> Path | None:
    """The local file or folder `spec` names, or None when it names none (then it may be
    a name or a hub id). Confined, only absolute paths count, and only under the read
    roots; a path elsewhere, or a relative one, is refused without looking at it."""
    if "\x00" in spec or len(spec) > MAX_SPEC_CHARS:
        raise InvalidArgument(f"{field}: not a name or a path ({len(spec)} characters{', with a NUL byte' if chr(0) in spec else ''})", field=field)
    path = Path(spec).expanduser()
    if not confined():
        return path if path.exists() else None
    if not path.is_absolute():
        if spec.startswith("."):
            raise _refused(spec, field)
        return None
    return path if inside_read_roots(path, spec, field) and path.exists() else None


def inside_read_roots(path: Path, spec: str, field: str) -> bool:
    """True if `path` (symlinks resolved) lies under a read root; PermissionDenied if not."""
    real = path.resolve()
    if any(real.is_relative_to(root) for root in read_roots()):
        return True
    raise _refused(spec, field)


def check_hub_id(repo_id: str, field: str) -> None:
    """A confined request may name a hub model only while the hub is used (not even
    from the local hub cache offline), from an allowed org."""
    if confined() and settings().offline:
        raise PermissionDenied(
            f"{field}: {repo_id!r} is not a registered name, an artifact or a path under the read roots, "
            "and hub ids are not accepted while PRUNELAB_OFFLINE is on", field=field)
    check_hub_org(repo_id, field)


def check_hub_org(repo_id: str, field: str) -> None:
    """Confined: `repo_id`'s org must be one PRUNELAB_HUB_ORGS lists, when it lists any."""
    allowed = settings().hub_orgs
    org = repo_id.partition("/")[0]
    if confined() and allowed and org not in allowed:
        raise PermissionDenied(f"{field}: hub org {org!r} is not in PRUNELAB_HUB_ORGS ({', '.join(allowed)})", field=field)


def refuse_path(spec: str, field: str) -> None:
    """Confined: a spec that reads as a path but names nothing usable is refused, unless it
    is an absolute path under the read roots (then the caller says it does not exist)."""
    if not confined():
        return
    path = Path(spec).expanduser()
    if not (path.is_absolute() and inside_read_roots(path, spec, field)):
        raise _refused(spec, field)


def _refused(spec: str, field: str) -> PermissionDenied:
    shown = spec if len(spec) <= 200 else spec[:200] + "..."
    return PermissionDenied(
        f"{field}: {shown!r} is not readable by this service: name a registered model, an artifact:// URI, "
        "a stored dataset, or a path under its read roots (PRUNELAB_DATA_DIR, PRUNELAB_READ_ROOTS)",
        field=field,
    )
