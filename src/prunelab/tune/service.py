"""The Tuner gRPC servicer: tuner.proto in, `run_tune` underneath."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import fields

import grpc
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from prunelab.config import settings
from prunelab.errors import InvalidArgument
from prunelab.rpc.jobs import JobSlots, stream_job
from prunelab.tune.job import TuneOutcome, TuneUpdate, check_tune_inputs, run_tune
from prunelab.tune.settings import TuneSettings
from prunelab.tune.spawn import SpawnedJob
from prunelab.tune.state import CurvePoint
from prunelab.v1 import common_pb2, tuner_pb2, tuner_pb2_grpc

SERVICE_NAME = "prunelab.v1.Tuner"
_OPTIONAL_FIELDS = ("dropout", "patience")  # proto3 `optional`: zero is a real value there


class TunerServicer(tuner_pb2_grpc.TunerServicer):
    """`processes` > 1 (PRUNELAB_TUNER_PROCESSES): each job trains data-parallel in that
    many torchrun processes (spawn.py), e.g. one per GPU of the node."""

    def __init__(self, max_concurrent_jobs: int | None = None, device: str | None = None, processes: int | None = None):
        self.slots = JobSlots(max_concurrent_jobs or settings().max_concurrent_jobs, "tuner")
        self.device = device or settings().torch_device()
        self.processes = processes or settings().tuner_processes

    def Tune(self, request: tuner_pb2.TuneRequest, context: grpc.ServicerContext) -> Iterator[tuner_pb2.TuneEvent]:
        tune_settings = settings_from_request(request)
        check_tune_inputs(tune_settings)  # INVALID_ARGUMENT before taking a slot

        def in_process(report: Callable[[TuneUpdate], None], _should_stop: Callable[[], bool]) -> TuneOutcome:
            # training stops at its next progress report (stream_job raises there)
            return run_tune(request.model, tune_settings, device=self.device, progress=report)

        job = SpawnedJob(request.model, tune_settings, self.device, self.processes) if self.processes > 1 else in_process

        with self.slots.admit():
            for item in stream_job(job, context, name=f"tune-{request.job_id or '-'}"):
                if isinstance(item, TuneUpdate):
                    yield progress_event(item, request.job_id)
                else:
                    yield tuner_pb2.TuneEvent(result=result_message(item, request.job_id))


def registration(servicer: TunerServicer) -> Callable[[grpc.Server], None]:
    """What `prunelab.rpc.serve` takes to host `servicer`."""
    return lambda server: tuner_pb2_grpc.add_TunerServicer_to_server(servicer, server)


def settings_from_request(request: tuner_pb2.TuneRequest) -> TuneSettings:
    """The request's settings; empty strings and zeros take TuneSettings' defaults."""
    if not request.model:
        raise InvalidArgument("name the model to tune", field="model")
    given = {}
    for f in fields(TuneSettings):
        value = getattr(request, f.name)
        if f.name in _OPTIONAL_FIELDS:
            if request.HasField(f.name):
                given[f.name] = value
        elif f.name == "target_modules":
            if value:
                given[f.name] = tuple(value)
        elif value:
            given[f.name] = value
    return TuneSettings(**given)


def progress_event(update: TuneUpdate, job_id: str) -> tuner_pb2.TuneEvent:
    progress = common_pb2.Progress(job_id=job_id, phase=update.phase, fraction=update.fraction, message=update.message)
    training = update.training
    if training is None:
        return tuner_pb2.TuneEvent(progress=progress)
    progress.done, progress.total = training.step, training.total_steps
    if training.eta_seconds is not None:
        progress.eta_seconds = training.eta_seconds
    metrics = tuner_pb2.TrainingMetrics(
        step=training.step, total_steps=training.total_steps, learning_rate=training.learning_rate,
        train_loss=training.train_loss, val_loss=training.val_loss, val_ppl=training.val_ppl,
    )
    return tuner_pb2.TuneEvent(progress=progress, metrics=metrics)


def _curve_point(point: CurvePoint) -> tuner_pb2.CurvePoint:
    return tuner_pb2.CurvePoint(step=point.step, train_loss=point.train_loss, val_loss=point.val_loss, val_ppl=point.val_ppl)


def _artifact(ref) -> common_pb2.ArtifactRef:
    return common_pb2.ArtifactRef(uri=ref.uri, digest=ref.digest, kind=ref.kind, size_bytes=ref.size)


def result_message(outcome: TuneOutcome, job_id: str) -> tuner_pb2.TuneResult:
    report = Struct()
    json_format.ParseDict(outcome.as_dict(), report)
    return tuner_pb2.TuneResult(
        job_id=job_id,
        artifact=_artifact(outcome.artifact),
        adapter=_artifact(outcome.adapter) if outcome.adapter else None,
        val_ppl_before=outcome.val_ppl_before,
        val_ppl_after=outcome.val_ppl_after,
        heldout_ppl_before=outcome.heldout_ppl_before,
        heldout_ppl_after=outcome.heldout_ppl_after,
        best_step=outcome.best_step,
        reason=outcome.reason,
        stop=outcome.stop,
        curve=[_curve_point(p) for p in outcome.curve],
        steps_run=outcome.steps_run,
        total_steps=outcome.total_steps,
        resumed_from_step=outcome.resumed_from_step,
        precision=outcome.precision,
        peak_memory_bytes=outcome.peak_memory_bytes,
        memory_kind=outcome.memory_kind,
        wall_seconds=outcome.wall_seconds,
        trained=outcome.trained,
        trainable_params=outcome.trainable_params,
        objective=outcome.objective,
        teacher=outcome.teacher["spec"] if outcome.teacher else "",
        tokens_seen=outcome.tokens_seen,
        **outcome.memory,
        report=report,
    )
