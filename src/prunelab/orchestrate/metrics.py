"""The orchestrator's Prometheus metrics, served on PRUNELAB_METRICS_PORT at /metrics.

Per job kind (prune | tune | evaluate | profile):
- `prunelab_jobs_queued` / `prunelab_jobs_running` (gauges): read from the SQLite job
  state at every scrape, so they are right after a restart and whoever scales the
  workers (KEDA on `prunelab_jobs_queued{kind="evaluate"}`) sees the real backlog;
- `prunelab_job_duration_seconds` (histogram) of the successful attempts;
- `prunelab_job_failures_total` (counter) of jobs that ended failed.
The last two count what this process saw since it started, as Prometheus counters do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from prunelab.orchestrate.graph import KINDS
from prunelab.orchestrate.state import StudyDB

log = logging.getLogger(__name__)

# Jobs take seconds (tiny models, profiles) to hours (tuning a 7B model).
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, float("inf"))


class JobMetrics:
    """The metrics of one orchestrator, in a registry of their own."""

    def __init__(self, db: StudyDB):
        self.registry = CollectorRegistry()
        self.registry.register(_QueueCollector(db))
        self._durations = Histogram("prunelab_job_duration_seconds", "Wall time of successful job attempts, in seconds",
                                    ["kind"], buckets=DURATION_BUCKETS, registry=self.registry)
        self._failures = Counter("prunelab_job_failures", "Jobs that ended failed", ["kind"], registry=self.registry)
        for kind in KINDS:  # every series exists from the start, at zero
            self._durations.labels(kind)
            self._failures.labels(kind)

    def job_done(self, kind: str, duration_s: float) -> None:
        self._durations.labels(kind).observe(duration_s)

    def job_failed(self, kind: str) -> None:
        self._failures.labels(kind).inc()

    def serve(self, port: int, host: str) -> WSGIServer:
        """Serve /metrics on a daemon thread; the caller shuts the server down."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)
        return server


class _QueueCollector(Collector):
    def __init__(self, db: StudyDB):
        self._db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depths = self._db.queue_depths()
        queued = GaugeMetricFamily("prunelab_jobs_queued", "Jobs ready to run that no worker has yet", labels=["kind"])
        running = GaugeMetricFamily("prunelab_jobs_running", "Jobs a worker is running", labels=["kind"])
        for kind in KINDS:
            waiting, busy = depths.get(kind, (0, 0))
            queued.add_metric([kind], waiting)
            running.add_metric([kind], busy)
        yield queued
        yield running
