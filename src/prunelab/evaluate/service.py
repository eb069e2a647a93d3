"""The Evaluator gRPC servicer: evaluator.proto in, `run_evaluation` underneath.

The job runs on a worker thread and the call streams its progress; a replica admits
PRUNELAB_MAX_CONCURRENT_JOBS jobs at once and answers RESOURCE_EXHAUSTED beyond,
so a client can try another replica. A cancelled call stops its job at the job's
next progress point, and the slot frees only once the job has stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import datetime

import grpc
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

import prunelab
from prunelab.config import settings
from prunelab.errors import InvalidArgument
from prunelab.evaluate.evaluation import Evaluation, EvaluationSpec, ProgressUpdate, run_evaluation
from prunelab.evaluate.perplexity import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from prunelab.evaluate.tasks import DEFAULT_SEED, TaskScore
from prunelab.rpc.jobs import JobSlots, stream_job
from prunelab.v1 import common_pb2, evaluator_pb2, evaluator_pb2_grpc

SERVICE_NAME = "prunelab.v1.Evaluator"
PRODUCER = "evaluator"


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServicer):
    def __init__(self, max_concurrent_jobs: int | None = None):
        self._slots = JobSlots(max_concurrent_jobs or settings().max_concurrent_jobs, "evaluator")

    def Evaluate(self, request: evaluator_pb2.EvaluateRequest, context: grpc.ServicerContext) -> Iterator[evaluator_pb2.EvaluateEvent]:
        spec = evaluation_spec(request)

        def job(report: Callable[[ProgressUpdate], None], should_stop: Callable[[], bool]) -> Evaluation:
            return run_evaluation(spec, report=report, should_stop=should_stop)

        with self._slots.admit():
            for item in stream_job(job, context, name=f"evaluate-{spec.job_id}"):
                if isinstance(item, ProgressUpdate):
                    yield evaluator_pb2.EvaluateEvent(progress=progress_message(item, request.job_id))
                else:
                    yield evaluator_pb2.EvaluateEvent(result=result_message(item, request))


def registration(servicer: EvaluatorServicer) -> Callable[[grpc.Server], None]:
    """What `prunelab.rpc.serve` takes to host `servicer`."""
    return lambda server: evaluator_pb2_grpc.add_EvaluatorServicer_to_server(servicer, server)


# ---- messages


def evaluation_spec(request: evaluator_pb2.EvaluateRequest) -> EvaluationSpec:
    """The spec a request asks for; zero and empty fields take the defaults."""
    if not request.model:
        raise InvalidArgument("name the checkpoint to evaluate", field="model")
    return EvaluationSpec(
        model=request.model,
        tasks=tuple(request.tasks),
        ppl_corpora=tuple(request.ppl_corpora),
        ppl_split=request.ppl_split or "validation",
        seq_len=request.seq_len or DEFAULT_SEQ_LEN,
        max_windows=request.max_windows or None,
        batch_size=request.batch_size or DEFAULT_BATCH_SIZE,
        limit=request.limit if request.HasField("limit") else None,
        num_fewshot=request.num_fewshot,
        seed=request.seed if request.HasField("seed") else DEFAULT_SEED,
        dtype=request.dtype or "float32",
        device=request.device or None,
        job_id=request.job_id or "-",
    )


def progress_message(update: ProgressUpdate, job_id: str) -> common_pb2.Progress:
    return common_pb2.Progress(
        job_id=job_id, phase=update.phase, fraction=update.fraction, message=update.message, done=update.done, total=update.total
    )


def result_message(evaluation: Evaluation, request: evaluator_pb2.EvaluateRequest) -> evaluator_pb2.EvaluateResult:
    result = evaluator_pb2.EvaluateResult(
        job_id=request.job_id,
        evaluation=common_pb2.ArtifactRef(
            uri=evaluation.artifact.uri,
            digest=evaluation.artifact.digest,
            kind=evaluation.artifact.kind,
            size_bytes=evaluation.artifact.size,
        ),
        checkpoint_sha256=evaluation.checkpoint.sha256,
        perplexity=[evaluator_pb2.CorpusPerplexity(**asdict(item)) for item in evaluation.perplexity],
        tasks=[_task_score(score) for score in evaluation.tasks],
        report=_report(evaluation, request),
    )
    if evaluation.average is not None:
        result.average.CopyFrom(evaluator_pb2.StudyAverage(**asdict(evaluation.average)))
    return result


def _task_score(score: TaskScore) -> evaluator_pb2.TaskScore:
    message = evaluator_pb2.TaskScore(
        task=score.task, n=score.n, num_fewshot=score.num_fewshot, version=score.version, metrics=score.metrics
    )
    for field in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        value = score.metric(field)
        if value is not None:
            setattr(message, field, value)
    return message


def _report(evaluation: Evaluation, request: evaluator_pb2.EvaluateRequest) -> common_pb2.Report:
    created_at = Timestamp()
    created_at.FromDatetime(datetime.fromisoformat(evaluation.document["provenance"]["created_at"]))
    params = Struct()
    params.update(json_format.MessageToDict(request, preserving_proto_field_name=True))
    provenance = common_pb2.Provenance(
        job_id=request.job_id,
        producer=PRODUCER,
        version=prunelab.__version__,
        inputs=[common_pb2.ArtifactRef(uri=evaluation.checkpoint.spec, digest=evaluation.checkpoint.sha256, kind="model")],
        params=params,
        created_at=created_at,
    )
    # Through JSON so that tuples, "N/A" stderrs and the like arrive as plain values.
    data = json_format.ParseDict(json.loads(json.dumps(evaluation.document, default=str)), Struct())
    return common_pb2.Report(provenance=provenance, data=data)
