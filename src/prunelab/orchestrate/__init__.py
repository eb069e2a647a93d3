"""Studies: a YAML file becomes durable jobs across the services and ends in a report.

`load_study` validates a study file; `Orchestrator` expands it into jobs
(`graph.expand`), keeps them in SQLite (`StudyDB`), dispatches them through a
`Dispatcher` (gRPC to a deployment, or the servicers in this process) with retries,
and writes the report (`report.write_report`) when the study has finished.
`OrchestratorServicer` is the gRPC face of all this (orchestrator.proto).
"""

from prunelab.orchestrate.dispatch import Dispatcher, GrpcDispatcher, InProcessDispatcher, dispatcher_from_settings
from prunelab.orchestrate.orchestrator import Orchestrator, RetryPolicy, Watchdog
from prunelab.orchestrate.state import StudyDB
from prunelab.orchestrate.study import Study, load_study, parse_study

__all__ = [
    "Dispatcher",
    "GrpcDispatcher",
    "InProcessDispatcher",
    "Orchestrator",
    "RetryPolicy",
    "Watchdog",
    "Study",
    "StudyDB",
    "dispatcher_from_settings",
    "load_study",
    "parse_study",
]
