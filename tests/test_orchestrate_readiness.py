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
from prunelab.evaluate.service import SERVICE_NAME as EVALUATOR
from prunelab.evaluate.service import EvaluatorServicer
from prunelab.evaluate.service import registration as evaluator_registration
from prunelab.orchestrate import RetryPolicy, dispatcher_from_settings, parse_study
from prunelab.store.seaweed import free_ports

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
