"""The terminal a person watches: on a terminal, a live table with a row per job of a
study, and a progress bar for a job run in this process; elsewhere (pytest's
captured output is no terminal) the plain lines scripts read, unchanged."""

from __future__ import annotations

import io
import logging
import os
import re
import sys

from rich.console import Console

from prunelab.cli.progress import StudyView, job_progress, live_console
from prunelab.v1 import orchestrator_pb2

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def terminal() -> Console:
    return Console(force_terminal=True, file=io.StringIO(), width=160)


def screen(console: Console) -> str:
    """What the console drew, colours and cursor moves removed."""
    return ANSI.sub("", console.file.getvalue())


def study(state: str, *jobs: orchestrator_pb2.Job) -> orchestrator_pb2.Study:
    counts = orchestrator_pb2.JobCounts(total=len(jobs), **{s: sum(j.state == s for j in jobs) for s in ("done", "running", "failed")})
    return orchestrator_pb2.Study(id="tiny-0123456789ab", state=state, counts=counts, jobs=jobs)


def test_the_study_view_draws_a_row_per_job_with_its_state_and_progress():
    jobs = [
        orchestrator_pb2.Job(id="1", key="evaluate base ppl wikitext2@128", state="done", duration_seconds=75),
        orchestrator_pb2.Job(id="2", key="prune taylor 20%", state="running", fraction=0.25, message="calibration 5/20"),
        orchestrator_pb2.Job(id="3", key="tune taylor 20% +LoRA", state="pending"),
        orchestrator_pb2.Job(id="4", key="profile l2 20%", state="failed", fraction=0.5, error="out of memory"),
    ]
    console = terminal()
    with StudyView(console) as view:
        view.update(study("running", *jobs))
        jobs[1] = orchestrator_pb2.Job(id="2", key="prune taylor 20%", state="running", fraction=0.75, message="calibration 15/20")
        view.update(study("running", *jobs))
    rows = {line.split()[0]: line for line in screen(console).splitlines()[-5:]}  # the last frame
    assert "tiny-0123456789ab  running  1/4 done" in rows["tiny-0123456789ab"]
    assert re.search(r"done +evaluate base ppl wikitext2@128 .*100% +0:01:15", rows["done"])  # its own duration
    assert re.search(r"running +prune taylor 20% .* 75% .*calibration 15/20", rows["running"])
    assert re.search(r"pending +tune taylor 20% \+LoRA .* 0%", rows["pending"])
    assert re.search(r"failed +profile l2 20% .* 50% .*out of memory", rows["failed"])


def test_a_job_bar_shows_the_latest_progress():
    console = terminal()
    with job_progress("prune", console=console) as show:
        show(0.4, "calibration: window 4/10")
    assert re.search(r"prune .* 40% .*calibration: window 4/10", screen(console))


def test_log_records_print_above_the_live_display_on_a_terminal(monkeypatch):
    """setup_logging's handler holds the stderr of its time; while a bar is drawn its
    records go through rich (above the bar), and back to that stderr after."""
    leader, follower = os.openpty()
    with os.fdopen(leader, "rb", buffering=0), open(follower, "w", encoding="utf-8") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        handler = logging.StreamHandler(sys.stderr)
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            console = terminal()
            with job_progress("prune", console=console):
                root.warning("calibration text is short")
            assert handler.stream is tty
        finally:
            root.removeHandler(handler)
    assert "calibration text is short" in screen(console)


def test_off_a_terminal_progress_is_the_plain_lines_of_before(capsys):
    assert live_console() is None and live_console(stderr=True) is None  # pytest captures both streams
    with job_progress("prune") as show:
        show(0.4, "calibration: window 4/10")
        show(1.0, "done: removed 20.07% of parameters")
    assert capsys.readouterr().err == "[ 40%] calibration: window 4/10\n[100%] done: removed 20.07% of parameters\n"
    with job_progress("prune", silent=True) as show:  # prune and tune with --json
        show(0.4, "calibration: window 4/10")
    assert capsys.readouterr() == ("", "")
