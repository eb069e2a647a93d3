"""The Pruner gRPC servicer: pruner.proto in, `run_prune` underneath."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import grpc
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from prunelab.config import settings
from prunelab.errors import InvalidArgument
from prunelab.prune.job import PruneOutcome, run_prune
from prunelab.prune.pruner import PruneSettings
from prunelab.rpc.jobs import JobSlots, stream_job
from prunelab.v1 import common_pb2, pruner_pb2, pruner_pb2_grpc

SERVICE_NAME = "prunelab.v1.Pruner"


@dataclass(frozen=True)
class ProgressUpdate:
    phase: str
    fraction: float
    message: str


class PrunerServicer(pruner_pb2_grpc.PrunerServicer):
    def __init__(self, max_concurrent_jobs: int | None = None, device: str = "cpu"):
        self.slots = JobSlots(max_concurrent_jobs or settings().max_concurrent_jobs, "pruner")
        self.device = device

    def Prune(self, request: pruner_pb2.PruneRequest, context: grpc.ServicerContext) -> Iterator[pruner_pb2.PruneEvent]:
        prune_settings = settings_from_request(request)
        prune_settings.validate()  # INVALID_ARGUMENT before taking a slot
        split = request.calibration_split or "train"

        def job(report: Callable[[ProgressUpdate], None], _should_stop: Callable[[], bool]) -> PruneOutcome:
            # the pruner stops at its next progress report (stream_job raises there)
            return run_prune(
                request.model, prune_settings, device=self.device, calibration_split=split,
                progress=lambda phase, fraction, message: report(ProgressUpdate(phase, fraction, message)),
            )

        with self.slots.admit():
            for item in stream_job(job, context, name=f"prune-{request.job_id or '-'}"):
                if isinstance(item, ProgressUpdate):
                    progress = common_pb2.Progress(job_id=request.job_id, phase=item.phase, fraction=item.fraction, message=item.message)
                    yield pruner_pb2.PruneEvent(progress=progress)
                else:
                    yield pruner_pb2.PruneEvent(result=result_message(item, request.job_id))


def registration(servicer: PrunerServicer) -> Callable[[grpc.Server], None]:
    """What `prunelab.rpc.serve` takes to host `servicer`."""
    return lambda server: pruner_pb2_grpc.add_PrunerServicer_to_server(servicer, server)


def settings_from_request(request: pruner_pb2.PruneRequest) -> PruneSettings:
    """The request's settings; empty strings and zeros take PruneSettings' defaults."""
    if not request.model:
        raise InvalidArgument("name the model to prune", field="model")
    given = {}
    for f in fields(PruneSettings):
        if f.name == "correction":
            if request.correction_method:
                given["correction"] = request.correction_method
            elif request.HasField("correction"):
                given["correction"] = request.correction
        elif getattr(request, f.name):
            given[f.name] = getattr(request, f.name)
    if "ratio" not in given:
        raise InvalidArgument("ratio must be in (0, 1), got 0", field="ratio")
    return PruneSettings(**given)


def result_message(outcome: PruneOutcome, job_id: str) -> pruner_pb2.PruneResult:
    report = outcome.report
    artifact = outcome.artifact
    details = Struct()
    # The kept indices stay out of the message: a 13B model's run to megabytes, and they
    # are in the checkpoint's prunelab.json ("pruning") for whoever needs them.
    json_format.ParseDict({key: value for key, value in outcome.as_dict().items() if key != "kept"}, details)
    return pruner_pb2.PruneResult(
        job_id=job_id,
        artifact=common_pb2.ArtifactRef(uri=artifact.uri, digest=artifact.digest, kind=artifact.kind, size_bytes=artifact.size),
        ratio_asked=report.ratio_asked,
        semantics=report.semantics,
        ratio_got=report.ratio_got,
        params_before=report.params_before,
        params_after=report.params_after,
        nonzero_params=report.nonzero_params,
        layer_widths=[pruner_pb2.LayerWidths(**w) for w in report.layer_widths],
        peak_memory_bytes=outcome.peak_memory_bytes,
        memory_kind=outcome.memory_kind,
        wall_seconds=outcome.wall_seconds,
        report=details,
    )
