"""What a person at a terminal sees while work runs: rich progress bars for a job
run in this process, and a live table of a study's jobs. When the output is not a
terminal (CI, a log file, a pipe) the callers print plain lines instead, so what
scripts read stays as it was; `live_console` says which applies.

Imported by the command handlers only, never at `prunelab --help` time (rich's
progress module alone costs ~0.1 s to import).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress_bar import ProgressBar
from rich.table import Column
from rich.text import Text

if TYPE_CHECKING:
    from prunelab.v1 import orchestrator_pb2

# ETA from the progress made over this window: long enough to smooth a job's uneven
# phases (loading, then calibration steps), short enough to follow a change of pace.
SPEED_WINDOW_S = 120.0
STATE_STYLES = {"pending": "dim", "running": "cyan", "done": "green", "failed": "bold red", "cancelled": "yellow"}
_FINAL = ("done", "failed", "cancelled")

ProgressSink = Callable[[float, str], None]  # (fraction of the job, what it is doing)


def live_console(stderr: bool = False) -> Console | None:
    """A console for live display on stdout (or stderr), or None where that stream is
    not an interactive terminal and plain lines are the right output."""
    console = Console(stderr=stderr)
    return console if console.is_terminal and not console.is_dumb_terminal else None


@contextlib.contextmanager
def job_progress(title: str, *, plain: bool = False, silent: bool = False, console: Console | None = None) -> Iterator[ProgressSink]:
    """A sink for the progress of a job run in this process, shown on stderr: a bar with
    elapsed time and ETA on a terminal (or on `console`), else (or when `plain`) a
    `[ 40%] what` line per update; nothing when `silent`."""
    console = console or (None if plain or silent else live_console(stderr=True))
    if silent or console is None:
        yield _ignore if silent else _print_line
        return
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        _message_column("doing"),
        console=console, speed_estimate_period=SPEED_WINDOW_S, refresh_per_second=4, expand=True, **_redirects(),
    )
    with progress, _logs_above_live_display():
        task = progress.add_task(title, total=1.0, doing="")
        yield lambda fraction, doing: progress.update(task, completed=fraction, doing=doing)


def _message_column(field: str) -> TextColumn:
    """The latest message, in whatever width the other columns leave, cut with an
    ellipsis: a long one (an artifact URI) must not squeeze the bar and the times."""
    return TextColumn(f"{{task.fields[{field}]}}", markup=False,
                      table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"))


def _ignore(_fraction: float, _doing: str) -> None:
    pass


def _print_line(fraction: float, doing: str) -> None:
    print(f"[{fraction:4.0%}] {doing}", file=sys.stderr, flush=True)


class StudyView:
    """A live table of a study: a header with the study's counts, then a row per job
    with its state, a progress bar, elapsed time, ETA and latest message. Use as a
    context manager and feed it every Study snapshot from WatchStudy."""

    def __init__(self, console: Console):
        self._progress = _StudyProgress(
            _StateColumn(), TextColumn("{task.description}", markup=False), _SteadyBarColumn(), TaskProgressColumn(),
            _JobElapsedColumn(), _JobRemainingColumn(), _message_column("detail"),
            console=console, speed_estimate_period=SPEED_WINDOW_S, refresh_per_second=2, expand=True, **_redirects(),
        )
        self._tasks: dict[str, TaskID] = {}
        self._running = contextlib.ExitStack()

    def __enter__(self) -> StudyView:
        self._running.enter_context(self._progress)
        self._running.enter_context(_logs_above_live_display())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._running.close()

    def update(self, study: orchestrator_pb2.Study) -> None:
        self._progress.header = _header(study)
        for job in study.jobs:
            self._update_row(job)

    def _update_row(self, job: orchestrator_pb2.Job) -> None:
        task = self._tasks.get(job.id)
        if task is None:
            # a job first seen running started before this view: its clock starts now
            task = self._tasks[job.id] = self._progress.add_task(job.key, total=1.0, start=False, state=job.state, detail="")
        if job.state == "running" and self._progress.tasks[task].start_time is None:
            self._progress.start_task(task)
        fields: dict[str, Any] = {"state": job.state, "detail": _detail(job)}
        if job.state == "done":
            fields["duration"] = job.duration_seconds
        self._progress.update(task, completed=1.0 if job.state == "done" else job.fraction, **fields)
        if job.state in _FINAL and self._progress.tasks[task].started:
            self._progress.stop_task(task)


class _StudyProgress(Progress):
    """rich's Progress with a header line above the job rows."""

    def __init__(self, *columns: ProgressColumn, **options: Any):
        self.header = Text("")  # before Progress.__init__, which renders once
        super().__init__(*columns, **options)

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.header
        yield self.make_tasks_table(self.tasks)


class _StateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        state = task.fields["state"]
        return Text(f"{state:9}", style=STATE_STYLES.get(state, ""))


class _SteadyBarColumn(BarColumn):
    """rich animates the bar of a task not started yet; here that is a job that is
    waiting, or one finished before the view began: neither is busy."""

    def render(self, task: Task) -> ProgressBar:
        bar = super().render(task)
        bar.pulse = False
        return bar


class _JobElapsedColumn(TimeElapsedColumn):
    """A finished job's own duration (also for jobs done before this view began)."""

    def render(self, task: Task) -> Text:
        if "duration" in task.fields:
            return Text(str(timedelta(seconds=int(task.fields["duration"]))), style="progress.elapsed")
        return super().render(task)


class _JobRemainingColumn(TimeRemainingColumn):
    """An ETA for running jobs only: a failed job's frozen rate predicts nothing."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.fields["state"] == "running" else Text("")


def _header(study: orchestrator_pb2.Study) -> Text:
    counts = study.counts
    header = Text(f"{study.id}  ")
    header.append(study.state, style=STATE_STYLES.get(study.state, ""))
    header.append(f"  {counts.done}/{counts.total} done ({counts.cached} reused), {counts.running} running, "
                  f"{counts.failed} failed, {counts.cancelled} cancelled")
    return header


def _detail(job: orchestrator_pb2.Job) -> str:
    if job.error:
        return job.error
    if job.cached_from:
        return f"reused {job.cached_from}"
    return job.message if job.state == "running" else ""


def _redirects() -> dict[str, bool]:
    """rich's Live reroutes writes to stdout and stderr above its display; only those
    streams that are terminals, so `2> errors.log` still gets the warnings."""
    return {"redirect_stdout": sys.stdout.isatty(), "redirect_stderr": sys.stderr.isatty()}


@contextlib.contextmanager
def _logs_above_live_display() -> Iterator[None]:
    """While rich's Live runs it replaces sys.stderr with a proxy that prints above the
    display; the root logger's handlers opened the real stderr before that, so point
    them at the proxy for the duration (else each log line tears the display)."""
    proxy = sys.stderr
    real = getattr(proxy, "rich_proxied_file", None)
    root_handlers = logging.getLogger().handlers if real is not None else []
    handlers = [h for h in root_handlers if isinstance(h, logging.StreamHandler) and h.stream is real]
    for handler in handlers:
        handler.setStream(proxy)
    try:
        yield
    finally:
        for handler in handlers:
            handler.setStream(real)
