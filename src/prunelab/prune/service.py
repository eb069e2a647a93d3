"""The Pruner gRPC servicer: pruner.proto in, `run_prune` underneath."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import grpc
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from prunelab.config import settings
from prunelab.errors import InvalidArgument
from prunelab.export import ExportOutcome, check_outtype, run_export
from prunelab.prune.job import PruneOutcome, run_prune
from prunelab.prune.pruner import PruneSettings
from prunelab.rpc.jobs import JobSlots, stream_job
from prunelab.v1 import common_pb2, pruner_pb2, pruner_pb2_grpc

SERVICE_NAME = "prunelab.v1.Pruner"
EXPORT_FORMAT = "gguf"


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

        yield from self._stream(job, context, f"prune-{request.job_id or '-'}", request.job_id, pruner_pb2.PruneEvent, result_message)

    def Export(self, request: pruner_pb2.ExportRequest, context: grpc.ServicerContext) -> Iterator[pruner_pb2.ExportEvent]:
        if not request.model:
            raise InvalidArgument("name the model to export", field="model")
        if request.format not in ("", EXPORT_FORMAT):
            raise InvalidArgument(f"format must be {EXPORT_FORMAT}, got {request.format!r}", field="format")
        outtype = request.outtype or "f16"
        check_outtype(outtype)  # INVALID_ARGUMENT before taking a slot

        def job(report: Callable[[ProgressUpdate], None], _should_stop: Callable[[], bool]) -> ExportOutcome:
            return run_export(request.model, outtype, progress=lambda phase, fraction, message: report(ProgressUpdate(phase, fraction, message)))

        yield from self._stream(job, context, f"export-{request.job_id or '-'}", request.job_id, pruner_pb2.ExportEvent, export_result_message)

    def _stream(self, job, context: grpc.ServicerContext, name: str, job_id: str, event: type, result: Callable) -> Iterator:
        """Run `job` in a slot, as a stream of `event`s: Progress, then the result."""
        with self.slots.admit():
            for item in stream_job(job, context, name=name):
                if isinstance(item, ProgressUpdate):
                    progress = common_pb2.Progress(job_id=job_id, phase=item.phase, fraction=item.fraction, message=item.message)
                    yield event(progress=progress)
                else:
                    yield event(result=result(item, job_id))


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


def export_result_message(outcome: ExportOutcome, job_id: str) -> pruner_pb2.ExportResult:
    artifact = outcome.artifact
    return pruner_pb2.ExportResult(
        job_id=job_id,
        artifact=common_pb2.ArtifactRef(uri=artifact.uri, digest=artifact.digest, kind=artifact.kind, size_bytes=artifact.size),
        architecture=outcome.file.architecture,
        outtype=outcome.file.outtype,
        size_bytes=outcome.file.size_bytes,
        tensors=outcome.file.tensors,
        padded_channels=outcome.file.padded_channels,
        wall_seconds=outcome.wall_seconds,
    )
