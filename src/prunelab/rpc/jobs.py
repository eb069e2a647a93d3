"""Long jobs behind streaming RPCs: run the job on a worker thread, stream its
progress as it comes, then its result, and stop it when the call ends early.

Every service with a long job (pruner, tuner, evaluator, profiler) serves it this
way; `JobSlots` is the per-replica admission limit (RESOURCE_EXHAUSTED beyond it,
so a client can retry elsewhere).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from prunelab.errors import ReplicaBusy

log = logging.getLogger(__name__)

# A job quiet this long (waiting out a store outage, one long step) sends its latest update
# again: the orchestrator's watchdog hears a live worker, and only a hung one falls silent.
HEARTBEAT_S = 5.0

Update = TypeVar("Update")
Result = TypeVar("Result")
_DONE = object()


class JobCancelled(Exception):
    """Raised inside a job (from its progress callback) once its call has ended."""


class JobSlots:
    """At most `limit` jobs (or streams) at once in this process; ReplicaBusy beyond."""

    def __init__(self, limit: int, what: str, setting: str = "PRUNELAB_MAX_CONCURRENT_JOBS", unit: str = "job(s)"):
        self.limit = limit
        self.what = what  # "this evaluator already runs 1 job(s)"
        self.setting = setting
        self.unit = unit
        self._slots = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            raise ReplicaBusy(f"this {self.what} already runs {self.limit} {self.unit} ({self.setting}); retry later or on another replica")
        try:
            yield
        finally:
            self._slots.release()


def stream_job(
    job: Callable[[Callable[[Update], None], Callable[[], bool]], Result], context: grpc.ServicerContext, name: str
) -> Iterator[Update | Result]:
    """Run `job(report, should_stop)`: yield each update it reports, then its result;
    re-raise its error. When the call ends first (client cancelled or gone),
    `should_stop()` turns true and the job's next report raises JobCancelled inside
    it; this waits for the job to stop so its resources are free before the slot is.
    While the job reports nothing, its latest update is sent again every HEARTBEAT_S."""
    updates: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    context.add_callback(stop.set)  # runs when the call ends, cancelled or not
    outcome: dict[str, Any] = {}

    def report(update: Update) -> None:
        if stop.is_set():
            raise JobCancelled(f"{name}: the call ended")
        updates.put(update)

    def run() -> None:
        try:
            outcome["result"] = job(report, stop.is_set)
        except BaseException as error:  # noqa: BLE001 - re-raised on the call's thread
            outcome["error"] = error
        finally:
            updates.put(_DONE)

    # The copied context carries the call's job id into the worker's log lines.
    worker = threading.Thread(target=contextvars.copy_context().run, args=(run,), name=name, daemon=True)
    worker.start()
    log_started(name)
    try:
        latest = None
        while True:
            try:
                item = updates.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                if latest is not None:
                    yield latest
                continue
            if item is _DONE:
                break
            latest = item
            yield item
    finally:
        stop.set()
        worker.join()
        release_cuda_cache()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["result"]


def log_started(name: str) -> None:
    """One line per job a replica starts ("prune-<job id>: started on this replica"): which
    replica ran which job, for operators (and the fault tests, which count them)."""
    log.info("%s: started on this replica", name)


def release_cuda_cache() -> None:
    """Hand the GPU memory the finished job's tensors held back to the driver, so the
    next job (or another process on the same GPU) can use it; PyTorch's caching
    allocator keeps it otherwise. A no-op where torch is not loaded or has no CUDA."""
    torch = sys.modules.get("torch")  # loaded by the job if it used torch; never imported here
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
