"""Orchestrator service: `python services/orchestrator/main.py` (port from PRUNELAB_GRPC_PORT).

Workers are dialled at PRUNELAB_PRUNER_ADDR, PRUNELAB_TUNER_ADDR, PRUNELAB_EVALUATOR_ADDR
and PRUNELAB_PROFILER_ADDR; a kind of job without an address runs in this process.
Studies and jobs live in PRUNELAB_ORCHESTRATOR_DB (SQLite); a restart resumes them.
Prometheus metrics are on PRUNELAB_METRICS_PORT (0: none) at /metrics.
"""

import signal

from prunelab.access import confine_process
from prunelab.config import settings
from prunelab.orchestrate import Orchestrator, StudyDB, dispatcher_from_settings
from prunelab.orchestrate.metrics import JobMetrics
from prunelab.orchestrate.service import SERVICE_NAME, OrchestratorServicer, registration
from prunelab.rpc import run_forever

if __name__ == "__main__":
    # run_forever awaits SIGTERM/SIGINT with sigwait, which needs them blocked in every
    # thread; the orchestrator's threads start first, so block them before.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    confine_process()  # before the first job: what requests name is confined (prunelab.access)
    cfg = settings()
    db = StudyDB(cfg.orchestrator_db)
    metrics = JobMetrics(db)
    # the gRPC bind address, "[::]" in containers, as an HTTP server takes it
    metrics_server = metrics.serve(cfg.metrics_port, cfg.grpc_host.strip("[]")) if cfg.metrics_port else None
    with Orchestrator(db, dispatcher_from_settings(cfg), max_parallel=cfg.orchestrator_max_parallel, metrics=metrics) as orchestrator:
        run_forever(registration(OrchestratorServicer(db, orchestrator)), service_names=[SERVICE_NAME])
    if metrics_server is not None:
        metrics_server.shutdown()
