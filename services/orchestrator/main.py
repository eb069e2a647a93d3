"""Orchestrator service: `python services/orchestrator/main.py` (port from PRUNELAB_GRPC_PORT).

Workers are dialled at PRUNELAB_PRUNER_ADDR, PRUNELAB_TUNER_ADDR, PRUNELAB_EVALUATOR_ADDR
and PRUNELAB_PROFILER_ADDR; a kind of job without an address runs in this process.
Studies and jobs live in PRUNELAB_ORCHESTRATOR_DB (SQLite); a restart resumes them.
"""

import signal

from prunelab.config import settings
from prunelab.orchestrate import Orchestrator, StudyDB, dispatcher_from_settings
from prunelab.orchestrate.service import SERVICE_NAME, OrchestratorServicer, registration
from prunelab.rpc import run_forever

if __name__ == "__main__":
    # run_forever awaits SIGTERM/SIGINT with sigwait, which needs them blocked in every
    # thread; the orchestrator's threads start first, so block them before.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    cfg = settings()
    db = StudyDB(cfg.orchestrator_db)
    with Orchestrator(db, dispatcher_from_settings(cfg), max_parallel=cfg.orchestrator_max_parallel) as orchestrator:
        run_forever(registration(OrchestratorServicer(db, orchestrator)), service_names=[SERVICE_NAME])
