"""Sending a job to the service that does it: over gRPC to a deployment, or to the
very same servicer in this process (embedded mode). Both give a `JobCall`: the
service's event stream, cancellable from another thread, failing with the same
status codes; the orchestrator's retries and state handling sit above and cannot
tell them apart.
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from prunelab.config import Settings, settings
from prunelab.orchestrate.graph import EVALUATE, EXPORT, KINDS, PROFILE, PRUNE, TUNE
from prunelab.rpc import InProcessRpcError, RpcStatus, call_in_process, job_metadata, make_channel
from prunelab.v1 import common_pb2


@dataclass(frozen=True)
class Binding:
    """Where one kind of job is served: its proto module, service and method."""

    module: str  # prunelab.v1.<module>_pb2 / _pb2_grpc
    service: str  # the service's name in the proto
    method: str
    request: str  # the request message's name
    servicer: str  # "prunelab.<domain>.service:<Class>"


BINDINGS = {
    PRUNE: Binding("pruner", "Pruner", "Prune", "PruneRequest", "prunelab.prune.service:PrunerServicer"),
    TUNE: Binding("tuner", "Tuner", "Tune", "TuneRequest", "prunelab.tune.service:TunerServicer"),
    EVALUATE: Binding("evaluator", "Evaluator", "Evaluate", "EvaluateRequest", "prunelab.evaluate.service:EvaluatorServicer"),
    PROFILE: Binding("profiler", "Profiler", "Profile", "ProfileRequest", "prunelab.profile.service:ProfilerServicer"),
    EXPORT: Binding("pruner", "Pruner", "Export", "ExportRequest", "prunelab.prune.service:PrunerServicer"),
}
# Parts of results too bulky for a database row; the stored artifacts keep them.
_BULKY = {EVALUATE: [("report", "data", "lm_eval")]}
READY_POLL_S = 0.5  # how often a wait for a worker checks whether its job was cancelled


class JobCall(Protocol):
    """One dispatched job: its events (Progress, then the result), and a way to stop it."""

    def __iter__(self) -> Iterator[Message]: ...

    def cancel(self) -> bool: ...


class NoResult(Exception):
    """The stream ended without a result: the worker went away mid-job."""


class Dispatcher(ABC):
    @abstractmethod
    def call(self, kind: str, request: Message, job_id: str) -> JobCall:
        """Start the job; failures surface while iterating the returned call."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


def request_message(kind: str, fields: dict[str, Any], job_id: str) -> Message:
    """The kind's request message with `fields` (protobuf JSON names) and the job id."""
    request_class = getattr(_pb2(kind), BINDINGS[kind].request)
    return json_format.ParseDict({**fields, "job_id": job_id}, request_class())


def run_call(
    call: JobCall, on_progress: Callable[[common_pb2.Progress], None], on_admitted: Callable[[], None] = lambda: None,
    on_heard: Callable[[], None] = lambda: None,
) -> Message:
    """Follow a call to its result, reporting each Progress event (and each bare
    Progress the dispatcher adds while it waits for the worker); `on_admitted` runs
    at the worker's first event, when the job has left the queue, and `on_heard` at
    every event from the worker (what the orchestrator's watchdog listens for)."""
    admitted = False
    for event in call:
        if isinstance(event, common_pb2.Progress):
            on_progress(event)
            continue
        on_heard()
        if not admitted:
            admitted = True
            on_admitted()
        which = event.WhichOneof("event")
        if which == "progress":
            on_progress(event.progress)
        elif which is not None:
            return getattr(event, which)
    raise NoResult("the stream ended without a result")


def result_dict(kind: str, result: Message) -> dict[str, Any]:
    """A result message as JSON for the database, without the bulky parts."""
    data = json_format.MessageToDict(result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for path in _BULKY.get(kind, []):
        parent = data
        for part in path[:-1]:
            parent = parent.get(part, {})
        parent.pop(path[-1], None)
    return data


def output_model(kind: str, result: dict[str, Any]) -> str | None:
    """The URI of the model a prune or tune job made."""
    return result["artifact"]["uri"] if kind in (PRUNE, TUNE) else None


class WorkerNotReady(Exception):
    """The job's worker accepted no connection within the readiness timeout."""


class Worker:
    """One gRPC target, and whether it has ever accepted a connection since this
    orchestrator started: until it has, waiting for it is "not ready yet", not a failure."""

    def __init__(self, kind: str, target: str, channel: grpc.Channel):
        self.name = f"{BINDINGS[kind].module} at {target}"
        self.channel = channel
        self.connected_once = False

    def wait_ready(self, timeout: float, cancelled: threading.Event) -> Iterator[common_pb2.Progress]:
        """Return once the channel is ready (a Progress line first if it is not at once);
        WorkerNotReady after `timeout` seconds; early, quietly, once `cancelled` is set."""
        ready = grpc.channel_ready_future(self.channel)
        deadline = time.monotonic() + timeout
        announced = False
        try:
            while True:
                try:
                    ready.result(timeout=READY_POLL_S)
                    self.connected_once = True
                    return
                except grpc.FutureTimeoutError:
                    pass
                if cancelled.is_set():
                    return
                if time.monotonic() > deadline:
                    raise WorkerNotReady(self._not_ready(timeout))
                if not announced:
                    announced = True
                    yield common_pb2.Progress(message=f"waiting for the {self.name} to accept connections (up to {timeout:.0f} s)")
        finally:
            ready.cancel()

    def _not_ready(self, timeout: float) -> str:
        history = ("it has not answered since the orchestrator started: check its address and that it runs"
                   if not self.connected_once else "it accepted connections before and has gone away")
        return f"the {self.name} accepted no connection within {timeout:.0f} s (PRUNELAB_WORKER_READY_TIMEOUT_S); {history}"


class GrpcJobCall:
    """A job's call to a worker: wait until the worker accepts connections (up to the
    readiness timeout), then the streaming call with wait_for_ready, so a connection
    that drops in between waits for the worker again instead of failing fast."""

    def __init__(self, worker: Worker, start: Callable[[], Any], ready_timeout: float):
        self._worker, self._start, self._ready_timeout = worker, start, ready_timeout
        self._cancelled = threading.Event()
        self._call: Any = None
        self._lock = threading.Lock()

    def cancel(self) -> bool:
        with self._lock:
            self._cancelled.set()
            if self._call is not None:
                self._call.cancel()
        return True

    def __iter__(self) -> Iterator[Message]:
        yield from self._worker.wait_ready(self._ready_timeout, self._cancelled)
        with self._lock:
            if self._cancelled.is_set():
                raise InProcessRpcError(RpcStatus(grpc.StatusCode.CANCELLED, "cancelled by the orchestrator"))
            self._call = self._start()
        yield from self._call


class GrpcDispatcher(Dispatcher):
    """Each kind to a gRPC target ("host:port", "dns:///evaluator:50051", "ipv4:a:p1,a:p2");
    channels round-robin over every address a target resolves to. A job waits up to
    `ready_timeout_s` for its worker to accept connections."""

    def __init__(self, targets: dict[str, str], ready_timeout_s: float | None = None):
        self._ready_timeout_s = settings().worker_ready_timeout_s if ready_timeout_s is None else ready_timeout_s
        self._channels = {target: make_channel(target) for target in set(targets.values())}
        self._workers = {kind: Worker(kind, target, self._channels[target]) for kind, target in targets.items()}
        self._methods = {
            kind: getattr(getattr(_pb2_grpc(kind), f"{BINDINGS[kind].service}Stub")(self._channels[target]), BINDINGS[kind].method)
            for kind, target in targets.items()
        }

    def call(self, kind: str, request: Message, job_id: str) -> JobCall:
        start = functools.partial(self._methods[kind], request, metadata=job_metadata(job_id), wait_for_ready=True)
        return GrpcJobCall(self._workers[kind], start, self._ready_timeout_s)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


class InProcessDispatcher(Dispatcher):
    """Each kind to its servicer object in this process, through `call_in_process`.
    A servicer is made on its kind's first job, so a study imports only what it uses."""

    def __init__(self, kinds: tuple[str, ...] = KINDS):
        self._kinds = kinds
        self._servicers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def call(self, kind: str, request: Message, job_id: str) -> JobCall:
        method = getattr(self._servicer(kind), BINDINGS[kind].method)
        return InProcessCall(call_in_process(method, request, job_metadata(job_id)))

    def close(self) -> None:
        pass  # servicers hold no connections; their jobs end with their calls

    def _servicer(self, kind: str) -> Any:
        if kind not in self._kinds:
            raise ValueError(f"this dispatcher serves {', '.join(self._kinds)}, not {kind}")
        with self._lock:
            if kind not in self._servicers:
                self._servicers[kind] = _make_servicer(kind)
            return self._servicers[kind]


class RoutingDispatcher(Dispatcher):
    """Some kinds remote, the others in-process."""

    def __init__(self, by_kind: dict[str, Dispatcher]):
        self._by_kind = by_kind

    def call(self, kind: str, request: Message, job_id: str) -> JobCall:
        return self._by_kind[kind].call(kind, request, job_id)

    def close(self) -> None:
        for dispatcher in set(self._by_kind.values()):
            dispatcher.close()


class InProcessCall:
    """An in-process stream with gRPC's cancel(): the servicer's generator is closed
    at the next event, which stops its job as a client cancellation would."""

    def __init__(self, events: Iterator[Message]):
        self._events = events
        self._cancelled = threading.Event()

    def cancel(self) -> bool:
        self._cancelled.set()
        return True

    def __iter__(self) -> Iterator[Message]:
        try:
            for event in self._events:
                if self._cancelled.is_set():
                    break
                yield event
        finally:
            self._events.close()  # type: ignore[attr-defined]
        if self._cancelled.is_set():
            raise InProcessRpcError(RpcStatus(grpc.StatusCode.CANCELLED, "cancelled by the orchestrator"))


def dispatcher_from_settings(cfg: Settings | None = None) -> Dispatcher:
    """gRPC for the kinds whose PRUNELAB_<SERVICE>_ADDR is set, in-process for the rest."""
    cfg = cfg or settings()
    targets = {kind: getattr(cfg, f"{BINDINGS[kind].module}_addr") for kind in KINDS}
    remote = {kind: target for kind, target in targets.items() if target}
    local = tuple(kind for kind in KINDS if kind not in remote)
    if not remote:
        return InProcessDispatcher()
    if not local:
        return GrpcDispatcher(remote, cfg.worker_ready_timeout_s)
    grpc_dispatcher, in_process = GrpcDispatcher(remote, cfg.worker_ready_timeout_s), InProcessDispatcher(local)
    return RoutingDispatcher({kind: grpc_dispatcher if kind in remote else in_process for kind in KINDS})


def _pb2(kind: str) -> Any:
    return importlib.import_module(f"prunelab.v1.{BINDINGS[kind].module}_pb2")


def _pb2_grpc(kind: str) -> Any:
    return importlib.import_module(f"prunelab.v1.{BINDINGS[kind].module}_pb2_grpc")


def _make_servicer(kind: str) -> Any:
    module, name = BINDINGS[kind].servicer.split(":")
    servicer_class = getattr(importlib.import_module(module), name)
    # The pruner's servicer defaults to the CPU; embedded mode uses the GPU when there is one.
    return servicer_class(device=settings().torch_device()) if kind == PRUNE else servicer_class()
