"""Workers that are late are not failures: a worker whose address is known but whose
server only starts minutes later (a pod pulling its image, importing torch) gets
its jobs once it serves; the orchestrator waits up to PRUNELAB_WORKER_READY_TIMEOUT_S
without counting failed attempts, and past it fails the job with a reason that says so.
Real sockets, a real Evaluator server, the orchestrator built from the environment."""

from __future__ import annotations

import threading

import pytest
import test_orchestrate
from test_orchestrate import finished, ppl_only, wait_for

from prunelab.config import settings
from prunelab.errors import ReplicaBusy, ResourceExhausted
from prunelab.evaluate.service import SERVICE_NAME as EVALUATOR
from prunelab.evaluate.service import EvaluatorServicer
from prunelab.evaluate.service import registration as evaluator_registration
from prunelab.orchestrate import RetryPolicy, Watchdog, dispatcher_from_settings, parse_study
from prunelab.store.seaweed import free_ports
from prunelab.v1.common_pb2 import Progress
from prunelab.v1.evaluator_pb2 import EvaluateEvent

orchestrator, study_yaml, text_dir = test_orchestrate.orchestrator, test_orchestrate.study_yaml, test_orchestrate.text_dir  # fixtures

# One broken attempt fails a job: these tests show waiting for a late worker is none.
NO_RETRIES = RetryPolicy(max_failures=1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _evaluation_study(study_yaml, text_dir) -> object:
    evaluation = ppl_only(text_dir)
    return parse_study(study_yaml(pruning=None, tuning=None, profiling=None, evaluation=evaluation), "late.yaml")


def _orchestrator_for_evaluator_at(orchestrator, monkeypatch, port: int, ready_timeout_s: int):
    monkeypatch.setenv("PRUNELAB_EVALUATOR_ADDR", f"127.0.0.1:{port}")
    monkeypatch.setenv("PRUNELAB_WORKER_READY_TIMEOUT_S", str(ready_timeout_s))
    settings.cache_clear()
    return orchestrator(dispatcher_from_settings(), retry=NO_RETRIES)


def _study_completes_with_a_worker_late_by(delay_s: float, orchestrator, grpc_server, study_yaml, text_dir, monkeypatch) -> None:
    [port] = free_ports(1)  # reserved for the worker, which is not there yet
    running = _orchestrator_for_evaluator_at(orchestrator, monkeypatch, port, ready_timeout_s=int(delay_s) + 120)
    late_start = threading.Timer(delay_s, lambda: grpc_server(evaluator_registration(EvaluatorServicer()), [EVALUATOR], port=port))
    late_start.start()
    try:
        study_id, _ = running.submit(_evaluation_study(study_yaml, text_dir), "late.yaml")
        waiting = wait_for(lambda: [j for j in running.db.jobs(study_id) if "waiting for the evaluator" in j.message], "the job to wait")
        assert waiting[0].state == "running" and waiting[0].attempts == 1
        [job] = finished(running.db, study_id)
    finally:
        late_start.join()
    assert job.state == "done", job.error
    assert job.attempts == 1  # the wait was one attempt, not a string of failed ones
    assert job.duration_s < delay_s  # the job's time is the worker's, not the wait
    assert running.db.study(study_id).state == "done"


def test_a_worker_that_starts_late_gets_its_job(orchestrator, grpc_server, study_yaml, text_dir, monkeypatch):
    _study_completes_with_a_worker_late_by(20.0, orchestrator, grpc_server, study_yaml, text_dir, monkeypatch)


@pytest.mark.slow
def test_a_worker_that_becomes_ready_three_minutes_late_gets_its_job(orchestrator, grpc_server, study_yaml, text_dir, monkeypatch):
    _study_completes_with_a_worker_late_by(180.0, orchestrator, grpc_server, study_yaml, text_dir, monkeypatch)


def test_a_job_fails_with_the_reason_when_its_worker_never_becomes_ready(orchestrator, study_yaml, text_dir, monkeypatch):
    [port] = free_ports(1)  # nothing will ever listen here
    running = _orchestrator_for_evaluator_at(orchestrator, monkeypatch, port, ready_timeout_s=3)
    study_id, _ = running.submit(_evaluation_study(study_yaml, text_dir), "never.yaml")
    [job] = finished(running.db, study_id)
    assert job.state == "failed" and job.attempts == 1
    assert f"the evaluator at 127.0.0.1:{port} accepted no connection within 3 s (PRUNELAB_WORKER_READY_TIMEOUT_S)" in job.error
    assert "has not answered since the orchestrator started" in job.error
    study = running.db.study(study_id)
    assert study.state == "failed" and "PRUNELAB_WORKER_READY_TIMEOUT_S" in study.error


class _BusyThen(EvaluatorServicer):
    """An evaluator that fails its first `failures` calls with `error`, then evaluates."""

    def __init__(self, error: Exception, failures: int):
        super().__init__()
        self.error, self.failures, self.calls = error, failures, 0

    def Evaluate(self, request, context):  # noqa: N802 - the gRPC method's name
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        yield from super().Evaluate(request, context)


@pytest.mark.parametrize(("error", "state", "calls"), [
    (ReplicaBusy("this evaluator already runs 1 job(s)"), "done", 4),  # retried for as long as it takes
    (ResourceExhausted("out of memory on the device"), "failed", 1),  # the same code, not busy: no retry loop
])
def test_only_a_busy_replica_is_retried_without_counting(orchestrator, grpc_server, study_yaml, text_dir, monkeypatch, error, state, calls):
    servicer = _BusyThen(error, failures=3)
    server = grpc_server(evaluator_registration(servicer), [EVALUATOR])
    running = _orchestrator_for_evaluator_at(orchestrator, monkeypatch, server.port, ready_timeout_s=30)
    study_id, _ = running.submit(_evaluation_study(study_yaml, text_dir), "busy.yaml")
    [job] = finished(running.db, study_id)
    assert (job.state, servicer.calls) == (state, calls), job.error
    if state == "failed":
        assert "out of memory on the device" in job.error


class _HangsFirst(EvaluatorServicer):
    """An evaluator whose first call sends one progress event and then hangs (a deadlocked
    job: the connection stays up, nothing more comes); later calls evaluate."""

    def __init__(self, release: threading.Event):
        super().__init__()
        self.release, self.calls = release, 0

    def Evaluate(self, request, context):  # noqa: N802 - the gRPC method's name
        self.calls += 1
        if self.calls == 1:
            yield EvaluateEvent(progress=Progress(job_id=request.job_id, phase="load", fraction=0.0))
            self.release.wait(120)
            return
        yield from super().Evaluate(request, context)


@pytest.fixture
def release():
    hung = threading.Event()
    yield hung
    hung.set()  # lets the hung handler thread end with the test


@pytest.mark.parametrize(("watchdog", "state", "calls", "reason"), [
    (Watchdog(stall_s=3), "done", 2, "no event from the worker for 3 s (PRUNELAB_JOB_STALL_TIMEOUT_S); re-dispatched"),
    (Watchdog(deadline_s=3), "failed", 1, "still running after 3 s (PRUNELAB_JOB_DEADLINE_S)"),
])
def test_the_watchdog_redispatches_a_hung_job_and_fails_one_past_its_deadline(
    orchestrator, grpc_server, study_yaml, text_dir, monkeypatch, release, watchdog, state, calls, reason
):
    servicer = _HangsFirst(release)
    server = grpc_server(evaluator_registration(servicer), [EVALUATOR])
    monkeypatch.setenv("PRUNELAB_EVALUATOR_ADDR", f"127.0.0.1:{server.port}")
    settings.cache_clear()
    running = orchestrator(dispatcher_from_settings(), watchdog=watchdog)
    study_id, _ = running.submit(_evaluation_study(study_yaml, text_dir), "hung.yaml")
    [job] = finished(running.db, study_id)
    assert (job.state, servicer.calls) == (state, calls), job.error
    if state == "failed":
        assert reason in job.error
    else:
        assert job.attempts == 2
