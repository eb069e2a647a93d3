"""The orchestrator: studies in, jobs dispatched, reports out.

One scheduler thread picks ready jobs (pending, every job they need done) in
dispatch order, serves any whose identical twin already finished (same inputs
hash, any study) from that result, and hands the rest to a pool of
`max_parallel` threads, each following one job's stream through a `Dispatcher`.
A worker that does not accept connections yet (its pod still pulling the image or
importing torch) is waited for, up to PRUNELAB_WORKER_READY_TIMEOUT_S, before the
job fails. Replica busy (RESOURCE_EXHAUSTED with error type ReplicaBusy) is retried with backoff for as long as
it takes; a worker that died mid-stream or failed the call as unavailable
(UNAVAILABLE, CANCELLED by the server side, DEADLINE_EXCEEDED, ABORTED, a stream that
ends without a result) is retried with backoff up to `RetryPolicy.max_failures`
times; anything else fails the job and, transitively, the jobs that need it. When a study has no unfinished
job left, its report is written and stored.

Every state change is written to SQLite first, so an orchestrator killed at any
point restarts with finished jobs finished and interrupted ones pending again.
One orchestrator at a time per database: an exclusive lock on `<db>.lock`, which
the kernel releases when the process dies.
"""

from __future__ import annotations

import fcntl
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from google.protobuf.message import Message

from prunelab.config import settings
from prunelab.data import find_task_data, hub
from prunelab.errors import FailedPrecondition, InvalidArgument, ReplicaBusy
from prunelab.limits import check_limit
from prunelab.orchestrate.content import fingerprints
from prunelab.orchestrate.dispatch import (
    Dispatcher,
    JobCall,
    NoResult,
    WorkerNotReady,
    output_model,
    request_message,
    result_dict,
    run_call,
)
from prunelab.orchestrate.graph import expand, resolve
from prunelab.orchestrate.metrics import JobMetrics
from prunelab.orchestrate.report import write_report
from prunelab.orchestrate.state import CANCELLED, DONE, FAILED, PENDING, JobRow, StudyDB, StudyRow
from prunelab.orchestrate.study import Study
from prunelab.rpc import error_detail

log = logging.getLogger(__name__)

BROKEN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
POLL_S = 0.5  # the scheduler also wakes at once on every submission, finished job and cancellation


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 1.0
    multiplier: float = 2.0
    max_s: float = 30.0
    # A busy replica frees up when its job ends, and asking again is one cheap call:
    # waiting up to max_s there left workers idle for half a minute between jobs.
    busy_max_s: float = 2.0
    # Broken attempts before the job fails (about 4 min of backoff, each attempt also
    # waiting for the worker to accept connections): a rollout replaces workers
    # mid-job and can take minutes. Busy replicas do not count.
    max_failures: int = 12

    def delay(self, retry: int, busy: bool = False) -> float:
        """Exponential backoff with jitter, so retries from many jobs spread out."""
        ceiling = self.busy_max_s if busy else self.max_s
        return min(ceiling, self.initial_s * self.multiplier**retry) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Watchdog:
    """When a dispatched job is given up on: no event from its worker for `stall_s`
    seconds (a worker that hangs while its connection stays up) is re-dispatched as a
    broken attempt; a job running longer than `deadline_s` fails. 0 turns either off.
    Both count from the worker's first event: waiting for a worker has its own limit."""

    stall_s: float = 0.0
    deadline_s: float = 0.0

    @classmethod
    def from_settings(cls) -> Watchdog:
        cfg = settings()
        return cls(cfg.job_stall_timeout_s, cfg.job_deadline_s)

    def verdict(self, running: RunningJob, now: float) -> tuple[str, str] | None:
        """("stalled" | "deadline", reason) when `running` is to be given up on, else None."""
        if running.admitted_at is None:
            return None
        if self.deadline_s and now - running.admitted_at > self.deadline_s:
            return "deadline", f"still running after {self.deadline_s:g} s (PRUNELAB_JOB_DEADLINE_S)"
        if self.stall_s and now - running.heard_at > self.stall_s:
            return "stalled", f"no event from the worker for {self.stall_s:g} s (PRUNELAB_JOB_STALL_TIMEOUT_S); re-dispatched"
        return None


@dataclass
class RunningJob:
    job: JobRow
    call: JobCall | None = None
    stop_state: str = ""  # set when the job must stop: cancelled, or pending again on shutdown
    stop_reason: str = ""
    stopped: threading.Event = field(default_factory=threading.Event)
    admitted_at: float | None = None  # monotonic: the worker's first event of this attempt
    heard_at: float = 0.0  # monotonic: its latest event
    given_up: tuple[str, str] | None = None  # the watchdog's verdict on this attempt

    def stop(self, state: str, reason: str) -> None:
        self.stop_state, self.stop_reason = state, reason
        self.stopped.set()
        if self.call is not None:
            self.call.cancel()


class Orchestrator:
    def __init__(
        self,
        db: StudyDB,
        dispatcher: Dispatcher,
        *,
        max_parallel: int = 1,
        retry: RetryPolicy | None = None,
        reports_dir: Path | None = None,
        metrics: JobMetrics | None = None,
        watchdog: Watchdog | None = None,
    ):
        if max_parallel < 1:
            raise InvalidArgument(f"max_parallel must be at least 1, got {max_parallel}", field="max_parallel")
        self.db = db
        self.dispatcher = dispatcher
        self.max_parallel = max_parallel
        self.retry = retry or RetryPolicy()
        self.reports_dir = reports_dir or settings().home / "reports"
        self.metrics = metrics
        self.watchdog = watchdog or Watchdog.from_settings()
        self._running: dict[str, RunningJob] = {}
        self._running_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="job")
        self._scheduler: threading.Thread | None = None
        self._lock_file: IO[str] | None = None

    # ---- lifecycle

    def __enter__(self) -> Orchestrator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._lock_database()
        requeued = self.db.reset_interrupted()
        if requeued:
            log.info("%d job(s) left running by a previous orchestrator are pending again", requeued)
        self._scheduler = threading.Thread(target=self._schedule, name="scheduler", daemon=True)
        self._scheduler.start()

    def stop(self) -> None:
        """Stop dispatching; running jobs are cancelled and left pending for the next start."""
        self._stopping.set()
        self._wake.set()
        if self._scheduler is not None:
            self._scheduler.join()  # first, so that nothing is launched after this
        for running in self._running_jobs():
            running.stop(PENDING, "orchestrator stopped; re-queued")
        self._pool.shutdown(wait=True)
        self.dispatcher.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock

    # ---- requests

    def submit(self, study: Study, source: str) -> tuple[str, bool]:
        """Queue the study's jobs (or re-queue the failed and cancelled jobs of the same
        study); returns its id and whether it existed already."""
        skipped = _tasks_without_data(study)
        names = expand(study, frozenset(skipped))
        jobs = expand(study, frozenset(skipped), fingerprints(job.inputs for job in names))
        check_limit("study_jobs", len(jobs), "jobs in the study")
        resumed = self.db.add_study(study.id, study.name, source, study.model_dump(mode="json"), _skipped_note(skipped), jobs)
        log.info("study %s %s: %d jobs", study.id, "resumed" if resumed else "submitted", len(jobs))
        self._wake.set()
        return study.id, resumed

    def cancel(self, study_id: str) -> None:
        self.db.cancel_study(study_id)
        self._stop_jobs_of_inactive_studies()
        self._wake.set()

    # ---- the scheduler

    def _schedule(self) -> None:
        while not self._stopping.is_set():
            try:
                self._stop_jobs_of_inactive_studies()
                self._give_up_on_hung_jobs()
                self.db.fail_blocked()
                self._dispatch_ready()
                self._finish_studies()
            except Exception:  # noqa: BLE001 - the scheduler must outlive one bad step; it is logged
                log.exception("scheduler step failed; retrying")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _dispatch_ready(self) -> None:
        while (free := self.max_parallel - len(self._running)) > 0 and not self._stopping.is_set():
            ready = self.db.ready_jobs(free)
            if not ready:
                return
            for job in ready:
                if not self._reuse(job):
                    self._launch(job)

    def _reuse(self, job: JobRow) -> bool:
        twin = self.db.cached_result(job.inputs_hash)
        if twin is None or twin.result is None:
            return False
        self.db.finish(job.id, twin.result, twin.duration_s, cached_from=twin.id)
        log.info("%s (%s): reused the result of %s", job.id, job.key, twin.id)
        return True

    def _launch(self, job: JobRow) -> None:
        self.db.claim(job.id)
        self.db.mark_study_running(job.study_id)
        running = RunningJob(job)
        with self._running_lock:
            self._running[job.id] = running
        self._pool.submit(self._execute, running)

    def _stop_jobs_of_inactive_studies(self) -> None:
        """Running jobs of studies cancelled here or by another process stop."""
        active = {study.id for study in self.db.active_studies()}
        for running in self._running_jobs():
            if running.job.study_id not in active and not running.stop_state:
                running.stop(CANCELLED, "the study was cancelled")

    def _give_up_on_hung_jobs(self) -> None:
        now = time.monotonic()
        for running in self._running_jobs():
            verdict = self.watchdog.verdict(running, now)
            if verdict and running.given_up is None and running.call is not None:
                log.warning("%s (%s): %s", running.job.id, running.job.key, verdict[1])
                running.given_up = verdict
                running.call.cancel()

    def _finish_studies(self) -> None:
        busy = {running.job.study_id for running in self._running_jobs()}
        for study in self.db.active_studies():
            if study.id not in busy and self.db.unfinished_jobs(study.id) == 0:
                self._finish(study)

    def _finish(self, study: StudyRow) -> None:
        jobs = self.db.jobs(study.id)
        failed = [job for job in jobs if job.state == FAILED]
        try:
            self.db.set_report(study.id, write_report(study, jobs, self.reports_dir / study.id))
        except Exception as error:  # noqa: BLE001 - the study ends failed, with the reason
            log.exception("study %s: writing the report failed", study.id)
            self.db.set_study_state(study.id, FAILED, f"writing the report failed: {type(error).__name__}: {error}")
            return
        error = f"{len(failed)} of {len(jobs)} jobs failed; first: {failed[0].key}: {failed[0].error}" if failed else ""
        self.db.set_study_state(study.id, FAILED if failed else DONE, error)
        log.info("study %s finished: %s", study.id, error or "all jobs done")

    # ---- one job

    def _execute(self, running: RunningJob) -> None:
        job = running.job
        try:
            request = request_message(job.kind, resolve(job.inputs, self._model_uris(job)), job.id)
            self._attempt_until_settled(running, request)
        except Exception as error:  # noqa: BLE001 - a job must never be left running
            log.exception("%s (%s) failed in the orchestrator", job.id, job.key)
            self._fail(job, f"orchestrator: {type(error).__name__}: {error}")
        finally:
            with self._running_lock:
                self._running.pop(job.id, None)
            self._wake.set()

    def _attempt_until_settled(self, running: RunningJob, request: Message) -> None:
        """Dispatch until the job is done, fails for good, or is stopped."""
        job = running.job
        failures = retries = 0
        while True:
            attempt = self.db.start_attempt(job.id)
            try:
                result, duration_s = self._dispatch(running, request)
            except (grpc.RpcError, NoResult, WorkerNotReady) as error:
                if running.stop_state:
                    self.db.end(job.id, running.stop_state, running.stop_reason)
                    return
                if isinstance(error, WorkerNotReady):
                    self._fail(job, str(error))
                    return
                verdict, running.given_up, running.admitted_at = running.given_up, None, None
                if verdict is not None and verdict[0] == "deadline":
                    self._fail(job, verdict[1])
                    return
                code = error.code() if isinstance(error, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
                busy = _replica_busy(error)
                why = verdict[1] if verdict else _describe(error)
                failures += code in BROKEN_CODES
                if not (busy or code in BROKEN_CODES) or failures >= self.retry.max_failures:
                    gave_up = f"gave up after {attempt} attempts: " if code in BROKEN_CODES else ""
                    self._fail(job, gave_up + why)
                    return
                if not self._wait_to_retry(running, attempt, why, self.retry.delay(retries, busy)):
                    return
                retries += 1
                continue
            self.db.finish(job.id, result_dict(job.kind, result), duration_s)
            if self.metrics is not None:
                self.metrics.job_done(job.kind, duration_s)
            return

    def _fail(self, job: JobRow, error: str) -> None:
        self.db.end(job.id, FAILED, error)
        if self.metrics is not None:
            self.metrics.job_failed(job.kind)

    def _dispatch(self, running: RunningJob, request: Message) -> tuple[Message, float]:
        """The job's result, and its duration in seconds from when a worker took it."""
        job = running.job
        started = time.monotonic()

        def admitted() -> None:
            nonlocal started
            started = running.admitted_at = time.monotonic()
            self.db.mark_started(job.id)

        def heard() -> None:
            running.heard_at = time.monotonic()

        running.call = self.dispatcher.call(job.kind, request, job.id)
        if running.stop_state:  # stopped between launch and call: stop() saw no call to cancel
            running.call.cancel()
        result = run_call(running.call, lambda progress: self.db.progress(job.id, progress.fraction, progress.message), admitted, heard)
        return result, round(time.monotonic() - started, 3)

    def _wait_to_retry(self, running: RunningJob, attempt: int, why: str, delay: float) -> bool:
        """Back off before the next attempt; False (and the job ended) if it was stopped meanwhile."""
        job = running.job
        log.warning("%s (%s) attempt %d: %s; retrying in %.1f s", job.id, job.key, attempt, why, delay)
        self.db.progress(job.id, 0.0, f"attempt {attempt}: {why}; retrying in {delay:.1f} s")
        if running.stopped.wait(delay):
            self.db.end(job.id, running.stop_state, running.stop_reason)
            return False
        return True

    def _model_uris(self, job: JobRow) -> dict[str, str]:
        if not job.needs:
            return {}
        needed = self.db.results_by_key(job.study_id, job.needs)
        return {key: output_model(row.kind, row.result) for key, row in needed.items() if row.result is not None}

    # ---- helpers

    def _running_jobs(self) -> list[RunningJob]:
        with self._running_lock:
            return list(self._running.values())

    def _lock_database(self) -> None:
        lock_path = self.db.path.with_name(self.db.path.name + ".lock")
        lock_file = open(lock_path, "w")  # noqa: SIM115 - held open for the orchestrator's lifetime
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise FailedPrecondition(
                f"another orchestrator is using {self.db.path}; follow its studies with `prunelab watch STUDY_ID`, "
                "or point PRUNELAB_ORCHESTRATOR_DB elsewhere"
            ) from None
        self._lock_file = lock_file


def _tasks_without_data(study: Study) -> list[str]:
    """The tasks to skip: their data is neither stored nor in $PRUNELAB_DATA_DIR/tasks/
    (imported into the store here, so every evaluator reads it) and the hub cannot be
    reached from here; none when the study lets evaluators use the hub regardless."""
    if study.evaluation is None or study.evaluation.missing_task_data == "hub":
        return []
    missing = [task for task in study.evaluation.tasks if find_task_data(task) is None]
    return missing if missing and hub.unreachable_reason() else []


def _skipped_note(tasks: list[str]) -> list[str]:
    if not tasks:
        return []
    return [
        f"tasks skipped, their data is not in the store or $PRUNELAB_DATA_DIR/tasks/ and the hub cannot be reached: "
        f"{', '.join(tasks)}. Import each (JSONL records in the task's "
        "Hugging Face schema) with `prunelab data import TASK PATH.jsonl --split SPLIT`, SPLIT being the one lm-eval "
        "evaluates (`PRUNELAB_OFFLINE=true prunelab evaluate --model MODEL --tasks TASK` prints the exact commands), "
        "or set evaluation.missing_task_data: hub to let online evaluators download them"
    ]


def _replica_busy(error: Exception) -> bool:
    """A replica at its job limit (retried for as long as it takes), told by the error type
    the worker put in the status details: a message over gRPC's size limit or a worker out
    of memory is RESOURCE_EXHAUSTED too, and retrying those would loop forever."""
    if not isinstance(error, grpc.RpcError) or error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    detail = error_detail(error)
    return detail is not None and detail.error_type == ReplicaBusy.__name__


def _describe(error: Exception) -> str:
    if not isinstance(error, grpc.RpcError):
        return f"UNAVAILABLE: {error}"
    detail = error_detail(error)
    where = f" ({detail.field})" if detail is not None and detail.field else ""
    return f"{error.code().name}{where}: {error.details()}"
