"""Durable state: studies and their jobs in one SQLite file (WAL), so a restarted
orchestrator resumes without redoing finished work, and `prunelab status` in
another process reads the same rows.

A job moves pending -> running -> done | failed | cancelled. `attempts` counts its
dispatches; a job found running at startup was cut off by a dead orchestrator and
goes back to pending. Every write is one short IMMEDIATE transaction; readers in
other processes never block it (WAL).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab.errors import NotFound
from prunelab.orchestrate.graph import JobSpec

PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"
JOB_STATES = (PENDING, RUNNING, DONE, FAILED, CANCELLED)
FINAL_STATES = (DONE, FAILED, CANCELLED)
ACTIVE_STUDY_STATES = (PENDING, RUNNING)
BUSY_TIMEOUT_S = 30.0
SCHEMA_VERSION = 1
# SQL: every job that job `j` needs is done (one `?` for DONE)
_NEEDS_DONE = "NOT EXISTS (SELECT 1 FROM json_each(j.needs) n JOIN jobs d ON d.study_id = j.study_id AND d.key = n.value WHERE d.state != ?)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    spec TEXT NOT NULL,            -- the validated study, JSON
    state TEXT NOT NULL,
    notes TEXT NOT NULL,           -- JSON list of lines for people (skipped tasks, ...)
    report TEXT,                   -- JSON: the stored report artifact and the folder it was written to
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    study_id TEXT NOT NULL REFERENCES studies(id),
    seq INTEGER NOT NULL,          -- dispatch order within the study
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    inputs TEXT NOT NULL,          -- JSON request fields, references to other jobs' outputs unresolved
    inputs_hash TEXT NOT NULL,
    needs TEXT NOT NULL,           -- JSON list of the keys of the jobs this one reads from
    meta TEXT NOT NULL,            -- JSON, for the report
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,                   -- JSON of the service's result message
    error TEXT NOT NULL DEFAULT '',
    cached_from TEXT NOT NULL DEFAULT '',
    fraction REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    duration_s REAL,               -- of the attempt that succeeded
    created_at REAL NOT NULL,
    started_at REAL,               -- when a worker took the current attempt; NULL while it waits for one
    finished_at REAL,
    updated_at REAL NOT NULL,
    UNIQUE (study_id, key)
);
CREATE INDEX IF NOT EXISTS jobs_by_hash ON jobs (inputs_hash, state);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, study_id);
"""


@dataclass(frozen=True)
class StudyRow:
    id: str
    name: str
    source: str
    spec: dict[str, Any]
    state: str
    notes: list[str]
    report: dict[str, Any] | None
    error: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class JobRow:
    id: str
    study_id: str
    seq: int
    key: str
    kind: str
    inputs: dict[str, Any]
    inputs_hash: str
    needs: list[str]
    meta: dict[str, Any]
    state: str
    attempts: int
    result: dict[str, Any] | None
    error: str
    cached_from: str
    fraction: float
    message: str
    duration_s: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float


class StudyDB:
    """Thread-safe access to the orchestrator's SQLite file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode; writes open their own IMMEDIATE transactions (see _write).
        self._connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        self._connection.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._connection.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL survives a killed process (not a power cut) and
            # makes every commit cheap; progress updates are frequent.
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.execute("PRAGMA foreign_keys=ON")
            self._connection.executescript(_SCHEMA)
            self._connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    # ---- studies

    def add_study(self, study_id: str, name: str, source: str, spec: dict[str, Any], notes: list[str], jobs: list[JobSpec]) -> bool:
        """Insert the study and its jobs. If it exists already, resume it: re-queue its
        failed and cancelled jobs and add the jobs it lacks (a task whose data has been
        imported since, say). True when it existed."""
        now = time.time()
        with self._write() as db:
            existed = db.execute("SELECT 1 FROM studies WHERE id = ?", (study_id,)).fetchone() is not None
            if not existed:
                db.execute(
                    "INSERT INTO studies (id, name, source, spec, state, notes, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (study_id, name, source, json.dumps(spec), PENDING, json.dumps(notes), now, now),
                )
            requeued = db.execute("UPDATE jobs SET state = ?, error = '', updated_at = ? WHERE study_id = ? AND state IN (?, ?)",
                                  (PENDING, now, study_id, FAILED, CANCELLED)).rowcount
            known = {key for (key,) in db.execute("SELECT key FROM jobs WHERE study_id = ?", (study_id,))}
            first_seq = db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM jobs WHERE study_id = ?", (study_id,)).fetchone()[0]
            new = [job for job in jobs if job.key not in known]
            db.executemany(
                "INSERT INTO jobs (id, study_id, seq, key, kind, inputs, inputs_hash, needs, meta, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (f"{study_id}.{seq:03d}", study_id, seq, job.key, job.kind, json.dumps(job.inputs), job.inputs_hash,
                     json.dumps(job.needs), json.dumps(job.meta), PENDING, now, now)
                    for seq, job in enumerate(new, start=first_seq)
                ],
            )
            if existed and (requeued or new):  # work to do again: the old report goes
                db.execute("UPDATE studies SET state = ?, error = '', report = NULL, notes = ?, updated_at = ? WHERE id = ?",
                           (PENDING, json.dumps(notes), now, study_id))
            return existed

    def study(self, study_id: str) -> StudyRow:
        row = self._read_one("SELECT * FROM studies WHERE id = ?", (study_id,))
        if row is None:
            raise NotFound(f"no study {study_id!r} in {self.path}", field="study_id")
        return _study_row(row)

    def studies(self) -> list[StudyRow]:
        return [_study_row(row) for row in self._read("SELECT * FROM studies ORDER BY created_at DESC")]

    def active_studies(self) -> list[StudyRow]:
        marks = ",".join("?" * len(ACTIVE_STUDY_STATES))
        return [_study_row(row) for row in self._read(f"SELECT * FROM studies WHERE state IN ({marks}) ORDER BY created_at", ACTIVE_STUDY_STATES)]

    def mark_study_running(self, study_id: str) -> None:
        with self._write() as db:
            db.execute("UPDATE studies SET state = ?, updated_at = ? WHERE id = ? AND state = ?", (RUNNING, time.time(), study_id, PENDING))

    def set_study_state(self, study_id: str, state: str, error: str = "") -> None:
        with self._write() as db:
            db.execute("UPDATE studies SET state = ?, error = ?, updated_at = ? WHERE id = ?", (state, error, time.time(), study_id))

    def set_report(self, study_id: str, report: dict[str, Any]) -> None:
        with self._write() as db:
            db.execute("UPDATE studies SET report = ?, updated_at = ? WHERE id = ?", (json.dumps(report), time.time(), study_id))

    def cancel_study(self, study_id: str) -> None:
        """The study and its pending jobs become cancelled; running jobs are left to
        whoever runs them (they see the study's state and stop)."""
        self.study(study_id)  # NotFound
        now = time.time()
        with self._write() as db:
            db.execute("UPDATE jobs SET state = ?, updated_at = ?, finished_at = ? WHERE study_id = ? AND state = ?",
                       (CANCELLED, now, now, study_id, PENDING))
            db.execute("UPDATE studies SET state = ?, updated_at = ? WHERE id = ? AND state IN (?, ?)",
                       (CANCELLED, now, study_id, *ACTIVE_STUDY_STATES))

    # ---- jobs

    def jobs(self, study_id: str) -> list[JobRow]:
        return [_job_row(row) for row in self._read("SELECT * FROM jobs WHERE study_id = ? ORDER BY seq", (study_id,))]

    def job(self, job_id: str) -> JobRow:
        row = self._read_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return _job_row(row)

    def reset_interrupted(self) -> int:
        """Jobs left running by an orchestrator that died go back to pending."""
        with self._write() as db:
            return db.execute("UPDATE jobs SET state = ?, fraction = 0, message = 'interrupted; re-queued', updated_at = ? WHERE state = ?",
                              (PENDING, time.time(), RUNNING)).rowcount

    def ready_jobs(self, limit: int) -> list[JobRow]:
        """Pending jobs of active studies whose needs are all done, in dispatch order."""
        rows = self._read(
            "SELECT j.* FROM jobs j JOIN studies s ON s.id = j.study_id "
            f"WHERE j.state = ? AND s.state IN (?, ?) AND {_NEEDS_DONE} "
            "ORDER BY s.created_at, j.seq LIMIT ?",
            (PENDING, *ACTIVE_STUDY_STATES, DONE, limit),
        )
        return [_job_row(row) for row in rows]

    def fail_blocked(self) -> int:
        """Fail pending jobs that need a failed or cancelled job, transitively; how many."""
        total = 0
        with self._write() as db:
            while True:
                blocked = db.execute(
                    "SELECT j.id, d.key, d.state FROM jobs j JOIN json_each(j.needs) n "
                    "JOIN jobs d ON d.study_id = j.study_id AND d.key = n.value WHERE j.state = ? AND d.state IN (?, ?)",
                    (PENDING, FAILED, CANCELLED),
                ).fetchall()
                if not blocked:
                    return total
                now = time.time()
                db.executemany("UPDATE jobs SET state = ?, error = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                               [(FAILED, f"not run: it needs {key!r}, which {state}", now, now, job_id) for job_id, key, state in blocked])
                total += len(blocked)

    def cached_result(self, inputs_hash: str) -> JobRow | None:
        """A finished job with these inputs, in any study."""
        row = self._read_one("SELECT * FROM jobs WHERE inputs_hash = ? AND state = ? ORDER BY finished_at LIMIT 1", (inputs_hash, DONE))
        return None if row is None else _job_row(row)

    def claim(self, job_id: str) -> None:
        """Pending -> running, before its first dispatch in this orchestrator."""
        self._update(job_id, state=RUNNING, fraction=0.0, message="queued", error="")

    def start_attempt(self, job_id: str) -> int:
        """Count one dispatch; returns the attempt number. The job waits for a worker
        (queued) until `mark_started`."""
        with self._write() as db:
            db.execute("UPDATE jobs SET attempts = attempts + 1, started_at = NULL, fraction = 0, message = 'dispatched', updated_at = ? WHERE id = ?",
                       (time.time(), job_id))
            return db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def mark_started(self, job_id: str) -> None:
        """A worker has taken the job's current attempt (its first event arrived)."""
        now = time.time()
        with self._write() as db:
            db.execute("UPDATE jobs SET started_at = ?, updated_at = ? WHERE id = ?", (now, now, job_id))

    def queue_depths(self) -> dict[str, tuple[int, int]]:
        """(queued, running) jobs of active studies by kind. Queued: ready to run
        (every job it needs done) but no worker has it yet, whether the orchestrator
        has not dispatched it or it waits for a worker or a free replica."""
        rows = self._read(
            "SELECT j.kind, "
            "  SUM(j.state = ? AND j.started_at IS NOT NULL), "
            f"  SUM((j.state = ? AND j.started_at IS NULL) OR (j.state = ? AND {_NEEDS_DONE})) "
            "FROM jobs j JOIN studies s ON s.id = j.study_id WHERE s.state IN (?, ?) GROUP BY j.kind",
            (RUNNING, RUNNING, PENDING, DONE, *ACTIVE_STUDY_STATES),
        )
        return {kind: (queued, running) for kind, running, queued in rows}

    def progress(self, job_id: str, fraction: float, message: str) -> None:
        self._update(job_id, fraction=fraction, message=message)

    def finish(self, job_id: str, result: dict[str, Any], duration_s: float | None, cached_from: str = "") -> None:
        self._update(job_id, state=DONE, result=json.dumps(result), duration_s=duration_s, cached_from=cached_from,
                     fraction=1.0, message="", finished_at=time.time())

    def end(self, job_id: str, state: str, error: str = "") -> None:
        """The job failed, was cancelled, or (state pending) goes back to the queue."""
        self._update(job_id, state=state, error=error, finished_at=None if state == PENDING else time.time())

    def unfinished_jobs(self, study_id: str) -> int:
        """Jobs of the study not yet in a final state."""
        marks = ",".join("?" * len(FINAL_STATES))
        row = self._read_one(f"SELECT COUNT(*) FROM jobs WHERE study_id = ? AND state NOT IN ({marks})", (study_id, *FINAL_STATES))
        return row[0]

    def results_by_key(self, study_id: str, keys: list[str]) -> dict[str, JobRow]:
        """The study's jobs named by `keys`."""
        marks = ",".join("?" * len(keys))
        rows = self._read(f"SELECT * FROM jobs WHERE study_id = ? AND key IN ({marks})", (study_id, *keys))
        return {row["key"]: _job_row(row) for row in rows}

    # ---- plumbing

    def _update(self, job_id: str, **values: Any) -> None:
        values["updated_at"] = time.time()
        assignments = ", ".join(f"{column} = ?" for column in values)
        with self._write() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id))

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def _read(self, query: str, parameters: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._connection.execute(query, parameters).fetchall()

    def _read_one(self, query: str, parameters: tuple[Any, ...]) -> sqlite3.Row | None:
        with self._lock:
            return self._connection.execute(query, parameters).fetchone()


def _study_row(row: sqlite3.Row) -> StudyRow:
    return StudyRow(
        id=row["id"], name=row["name"], source=row["source"], spec=json.loads(row["spec"]), state=row["state"],
        notes=json.loads(row["notes"]), report=json.loads(row["report"]) if row["report"] else None, error=row["error"],
        created_at=row["created_at"], updated_at=row["updated_at"],
    )


def _job_row(row: sqlite3.Row) -> JobRow:
    values = dict(row)
    for column in ("inputs", "needs", "meta"):
        values[column] = json.loads(values[column])
    values["result"] = json.loads(values["result"]) if values["result"] else None
    return JobRow(**values)
