"""The Orchestrator gRPC servicer: orchestrator.proto in, `Orchestrator` and
`StudyDB` underneath, and the deployment's store for data in (ImportDataset)
and artifacts out (ListArtifacts, GetArtifact).

With an `Orchestrator` it accepts studies; without one it only reads the
database, which is how the CLI's `status`, `watch`, `report` and `cancel` work on
a local database that another process (`prunelab run`) is executing: that
process notices a cancellation in the database and stops its jobs.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from prunelab.config import settings
from prunelab.data import import_dataset
from prunelab.errors import FailedPrecondition
from prunelab.orchestrate.orchestrator import Orchestrator
from prunelab.orchestrate.state import FINAL_STATES, JOB_STATES, JobRow, StudyDB, StudyRow
from prunelab.orchestrate.study import parse_study
from prunelab.orchestrate.transfer import artifact_stream, receive_upload
from prunelab.rpc.jobs import JobSlots
from prunelab.store import ArtifactRef, open_store
from prunelab.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

SERVICE_NAME = "prunelab.v1.Orchestrator"
WATCH_POLL_S = 0.5
DEFAULT_SOURCE = "<study>"


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, db: StudyDB, orchestrator: Orchestrator | None = None, max_watch_streams: int | None = None):
        self.db = db
        self.orchestrator = orchestrator
        self._watch_slots = JobSlots(
            max_watch_streams or settings().max_watch_streams, "orchestrator", "PRUNELAB_MAX_WATCH_STREAMS", "WatchStudy stream(s)")

    def SubmitStudy(self, request: orchestrator_pb2.SubmitStudyRequest, context: grpc.ServicerContext) -> orchestrator_pb2.SubmitStudyResponse:
        if self.orchestrator is None:
            raise FailedPrecondition("this process only reads studies; run the study with `prunelab run` or submit it to an orchestrator")
        source = request.source or DEFAULT_SOURCE
        study_id, resumed = self.orchestrator.submit(parse_study(request.study_yaml, source), source)
        return orchestrator_pb2.SubmitStudyResponse(study=self._study(study_id), resumed=resumed)

    def GetStudy(self, request: orchestrator_pb2.GetStudyRequest, context: grpc.ServicerContext) -> orchestrator_pb2.Study:
        return self._study(request.study_id)

    def ListStudies(self, request: orchestrator_pb2.ListStudiesRequest, context: grpc.ServicerContext) -> orchestrator_pb2.ListStudiesResponse:
        studies = [study_message(row, self.db.jobs(row.id), with_jobs=False) for row in self.db.studies()]
        return orchestrator_pb2.ListStudiesResponse(studies=studies)

    def WatchStudy(self, request: orchestrator_pb2.WatchStudyRequest, context: grpc.ServicerContext) -> Iterator[orchestrator_pb2.Study]:
        with self._watch_slots.admit():  # ReplicaBusy past PRUNELAB_MAX_WATCH_STREAMS
            yield from self._watch(request.study_id, context)

    def _watch(self, study_id: str, context: grpc.ServicerContext) -> Iterator[orchestrator_pb2.Study]:
        last = b""
        while context.is_active():
            study = self._study(study_id)
            snapshot = study.SerializeToString(deterministic=True)
            if snapshot != last:
                last = snapshot
                yield study
            if study.state in FINAL_STATES:
                return
            time.sleep(WATCH_POLL_S)

    def CancelStudy(self, request: orchestrator_pb2.CancelStudyRequest, context: grpc.ServicerContext) -> orchestrator_pb2.Study:
        if self.orchestrator is not None:
            self.orchestrator.cancel(request.study_id)
        else:
            self.db.cancel_study(request.study_id)
        return self._study(request.study_id)

    def GetReport(self, request: orchestrator_pb2.GetReportRequest, context: grpc.ServicerContext) -> orchestrator_pb2.GetReportResponse:
        row = self.db.study(request.study_id)
        if row.report is None:
            raise FailedPrecondition(f"study {row.id} is {row.state}; its report is written once every job has finished", field="study_id")
        folder = Path(row.report["dir"])
        if not (folder / "report.md").is_file():  # written on another host, or the folder was removed: the store has it
            folder = open_store().get_dir(row.report["uri"])
        files = [orchestrator_pb2.ReportFile(name=str(path.relative_to(folder)), content=path.read_bytes())
                 for path in sorted(folder.rglob("*")) if path.is_file()]
        return orchestrator_pb2.GetReportResponse(
            report=_artifact(row.report), report_dir=row.report["dir"], markdown=(folder / "report.md").read_text(encoding="utf-8"), files=files,
        )

    def ImportDataset(self, request_iterator: Iterator[orchestrator_pb2.ImportDatasetRequest], context: grpc.ServicerContext
                      ) -> orchestrator_pb2.ImportDatasetResponse:
        with tempfile.TemporaryDirectory(prefix="prunelab-upload-") as staging:
            header, path = receive_upload(request_iterator, Path(staging), settings().max_upload_bytes)
            dataset = import_dataset(header.name, path, split=header.split or None, kind=header.format or None)
        ref = open_store().stat(dataset.uri)
        return orchestrator_pb2.ImportDatasetResponse(
            name=dataset.name, format=dataset.format, dataset=_artifact_ref(ref),
            splits=[orchestrator_pb2.DatasetSplit(name=split, rows=info.rows, words=info.words) for split, info in sorted(dataset.splits.items())],
        )

    def ListArtifacts(self, request: orchestrator_pb2.ListArtifactsRequest, context: grpc.ServicerContext) -> orchestrator_pb2.ListArtifactsResponse:
        return orchestrator_pb2.ListArtifactsResponse(artifacts=[_artifact_ref(ref) for ref in open_store().list(request.kind or None)])

    def GetArtifact(self, request: orchestrator_pb2.GetArtifactRequest, context: grpc.ServicerContext) -> Iterator[orchestrator_pb2.GetArtifactResponse]:
        return artifact_stream(open_store(), request.uri)

    def _study(self, study_id: str) -> orchestrator_pb2.Study:
        return study_message(self.db.study(study_id), self.db.jobs(study_id))


def registration(servicer: OrchestratorServicer) -> Callable[[grpc.Server], None]:
    """What `prunelab.rpc.serve` takes to host `servicer`."""
    return lambda server: orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(servicer, server)


def study_message(row: StudyRow, jobs: list[JobRow], with_jobs: bool = True) -> orchestrator_pb2.Study:
    states = Counter(job.state for job in jobs)
    message = orchestrator_pb2.Study(
        id=row.id, name=row.name, source=row.source, state=row.state, error=row.error, notes=row.notes,
        counts=orchestrator_pb2.JobCounts(total=len(jobs), cached=sum(bool(job.cached_from) for job in jobs),
                                          **{state: states[state] for state in JOB_STATES}),
        jobs=[_job(job) for job in jobs] if with_jobs else [],
    )
    message.created_at.FromNanoseconds(int(row.created_at * 1e9))
    message.updated_at.FromNanoseconds(int(row.updated_at * 1e9))
    if row.report is not None:
        message.report.CopyFrom(_artifact(row.report))
        message.report_dir = row.report["dir"]
    return message


def _job(job: JobRow) -> orchestrator_pb2.Job:
    return orchestrator_pb2.Job(
        id=job.id, key=job.key, kind=job.kind, state=job.state, attempts=job.attempts, fraction=job.fraction, message=job.message,
        error=job.error, cached_from=job.cached_from, inputs_hash=job.inputs_hash, duration_seconds=job.duration_s or 0.0, needs=job.needs,
    )


def _artifact_ref(ref: ArtifactRef) -> common_pb2.ArtifactRef:
    return common_pb2.ArtifactRef(uri=ref.uri, digest=ref.digest, kind=ref.kind, size_bytes=ref.size)


def _artifact(report: dict) -> common_pb2.ArtifactRef:
    return common_pb2.ArtifactRef(uri=report["uri"], digest=report["digest"], kind=report["kind"], size_bytes=report["size_bytes"])
