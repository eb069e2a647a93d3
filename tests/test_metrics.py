"""The orchestrator's Prometheus endpoint, scraped over real HTTP: queued and running
jobs per kind read from the SQLite job state (so a restarted orchestrator, or a
fresh reader of the same database, reports the same backlog), job durations and
failures as the jobs end."""

from __future__ import annotations

import urllib.request

import pytest
import test_orchestrate
from prometheus_client.parser import text_string_to_metric_families
from test_orchestrate import finished, ppl_only, wait_for

from prunelab.config import settings
from prunelab.evaluate.service import SERVICE_NAME as EVALUATOR
from prunelab.evaluate.service import EvaluatorServicer
from prunelab.evaluate.service import registration as evaluator_registration
from prunelab.orchestrate import GrpcDispatcher, StudyDB, parse_study
from prunelab.orchestrate.graph import EVALUATE, KINDS
from prunelab.orchestrate.metrics import JobMetrics
from prunelab.store.seaweed import free_ports

orchestrator, study_yaml, text_dir = test_orchestrate.orchestrator, test_orchestrate.study_yaml, test_orchestrate.text_dir  # fixtures

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scrape(target: int | str) -> dict[tuple[str, str], float]:
    """GET /metrics on a local port or at a URL: {(sample name, kind label): value}."""
    url = target if isinstance(target, str) else f"http://127.0.0.1:{target}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(sample.name, sample.labels.get("kind", "")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples if "le" not in sample.labels}


@pytest.fixture
def metrics_server():
    """`metrics_server(db)`: JobMetrics for `db` served on a free port; returns (metrics, port)."""
    servers = []

    def start(db: StudyDB) -> tuple[JobMetrics, int]:
        metrics = JobMetrics(db)
        servers.append(metrics.serve(0, "127.0.0.1"))
        return metrics, servers[-1].server_port

    yield start
    for server in servers:
        server.shutdown()


def test_metrics_follow_the_job_state_across_a_restart_and_count_durations_and_failures(
    orchestrator, metrics_server, grpc_server, study_yaml, text_dir
):
    [port] = free_ports(1)  # the evaluator's, started later: until then its jobs are queued
    db = StudyDB(settings().orchestrator_db)
    metrics, metrics_port = metrics_server(db)
    running = orchestrator(GrpcDispatcher({EVALUATE: f"127.0.0.1:{port}"}, ready_timeout_s=300), metrics=metrics, max_parallel=1)
    # two perplexity jobs; with max_parallel 1, one waits for the worker and one for the orchestrator
    evaluation = ppl_only(text_dir, seq_lens=[4, 8])
    study = parse_study(study_yaml(pruning=None, tuning=None, profiling=None, evaluation=evaluation), "metrics.yaml")
    study_id, _ = running.submit(study, "metrics.yaml")
    wait_for(lambda: any("waiting for the evaluator" in job.message for job in running.db.jobs(study_id)), "a job waiting for its worker")

    before = scrape(metrics_port)
    assert before[("prunelab_jobs_queued", EVALUATE)] == 2 and before[("prunelab_jobs_running", EVALUATE)] == 0
    assert {kind for name, kind in before if name == "prunelab_jobs_queued"} == set(KINDS)
    # what a restarted orchestrator reports before it has dispatched anything: the database's view
    _, reread_port = metrics_server(StudyDB(db.path))
    assert scrape(reread_port)[("prunelab_jobs_queued", EVALUATE)] == 2

    grpc_server(evaluator_registration(EvaluatorServicer()), [EVALUATOR], port=port)
    jobs = finished(running.db, study_id)
    assert [job.state for job in jobs] == ["done", "done"]
    after = scrape(metrics_port)
    assert after[("prunelab_jobs_queued", EVALUATE)] == after[("prunelab_jobs_running", EVALUATE)] == 0
    assert after[("prunelab_job_duration_seconds_count", EVALUATE)] == 2
    assert after[("prunelab_job_duration_seconds_sum", EVALUATE)] == pytest.approx(sum(job.duration_s for job in jobs), abs=0.01)
    assert after[("prunelab_job_failures_total", EVALUATE)] == 0

    # a job the worker refuses (no such corpus) counts as a failure
    broken = ppl_only(text_dir / "missing")
    failing = parse_study(study_yaml(pruning=None, tuning=None, profiling=None, evaluation=broken), "broken.yaml")
    failing_id, _ = running.submit(failing, "broken.yaml")
    assert finished(running.db, failing_id)[0].state == "failed"
    assert scrape(metrics_port)[("prunelab_job_failures_total", EVALUATE)] == 1
