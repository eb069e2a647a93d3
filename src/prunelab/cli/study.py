"""`prunelab run | status | watch | report | cancel`: studies.

`run STUDY.yaml` runs a study in this process (the embedded mode: every service's
servicer in-process, the local store, the database at PRUNELAB_ORCHESTRATOR_DB),
showing a live table of its jobs on a terminal (a line per job event otherwise, or
with --plain), and ends with where the report is. Running the same
file again resumes it (finished jobs are kept). With `--orchestrator HOST:PORT` it
submits the study to a deployment instead and follows it there.

The other commands read the same database (another process may be running the
study) or, with `--orchestrator`, ask the deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from prunelab import errors
from prunelab.config import settings
from prunelab.v1 import orchestrator_pb2

EXIT_OK, EXIT_FAILED = 0, 1
PROGRESS_EVERY_S = 15.0  # a running job's progress line at most this often


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run a study file (in this process unless --orchestrator)", description=__doc__)
    run.add_argument("study", type=Path, help="the study's YAML file, e.g. examples/smollm2.yaml")
    _orchestrator_option(run)
    run.add_argument("--max-parallel", type=int, default=1,
                     help="embedded mode: jobs at once (default 1; jobs in one process share its cores)")
    run.add_argument("--out", type=Path, help="also copy the report's files into this folder")
    run.add_argument("--detach", action="store_true", help="with --orchestrator: submit, print the study id, and return")
    _plain_option(run)
    run.set_defaults(handler=_run)

    status = subparsers.add_parser("status", help="list studies, or show one study's jobs")
    status.add_argument("study_id", nargs="?", help="a study id; none lists every study")
    _orchestrator_option(status)
    status.set_defaults(handler=_status)

    watch = subparsers.add_parser("watch", help="follow a study's jobs live until it finishes")
    watch.add_argument("study_id")
    _orchestrator_option(watch)
    _plain_option(watch)
    watch.set_defaults(handler=_watch)

    report = subparsers.add_parser("report", help="print a finished study's report (Markdown) and where it is")
    report.add_argument("study_id")
    _orchestrator_option(report)
    report.add_argument("--out", type=Path, help="also copy the report's files into this folder")
    report.set_defaults(handler=_report)

    cancel = subparsers.add_parser("cancel", help="cancel a study: running jobs stop, pending ones are dropped")
    cancel.add_argument("study_id")
    _orchestrator_option(cancel)
    cancel.set_defaults(handler=_cancel)


def _orchestrator_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--orchestrator", metavar="HOST:PORT",
                        help="a deployment's orchestrator (gRPC target); default: this machine's database")


def _plain_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plain", action="store_true",
                        help="a line per job event even on a terminal (the default when stdout is not one)")


# ---- commands


def _run(args: argparse.Namespace) -> int:
    try:
        text = args.study.read_text(encoding="utf-8")
    except OSError as error:
        raise errors.InvalidArgument(f"{args.study}: cannot read the study file: {error.strerror}") from None
    submit = orchestrator_pb2.SubmitStudyRequest(study_yaml=text, source=str(args.study))
    if args.orchestrator:
        with _client(args.orchestrator) as client:
            response = _call(client.SubmitStudy, submit)
            _print_submitted(response)
            if args.detach:
                return EXIT_OK
            try:
                return _follow(client, response.study.id, args.out, args.plain)
            except KeyboardInterrupt:
                print(f"stopped watching; the study goes on: prunelab watch {response.study.id} --orchestrator {args.orchestrator}")
                raise
    return _run_embedded(submit, args)


def _run_embedded(submit: orchestrator_pb2.SubmitStudyRequest, args: argparse.Namespace) -> int:
    from prunelab.orchestrate import InProcessDispatcher, Orchestrator, StudyDB, parse_study
    from prunelab.orchestrate.service import OrchestratorServicer

    parse_study(submit.study_yaml, submit.source)  # a bad file fails before anything starts
    _quiet_libraries()
    db = StudyDB(settings().orchestrator_db)
    try:
        with Orchestrator(db, InProcessDispatcher(), max_parallel=args.max_parallel) as orchestrator:
            client = LocalClient(OrchestratorServicer(db, orchestrator))
            response = _call(client.SubmitStudy, submit)
            _print_submitted(response)
            try:
                return _follow(client, response.study.id, args.out, args.plain)
            except KeyboardInterrupt:
                print(f"interrupted; finished jobs are kept. Resume with: prunelab run {submit.source}")
                raise
    finally:
        db.close()


def _quiet_libraries() -> None:
    """The progress lines tell the story: no per-load progress bars, and (unless
    PRUNELAB_LOG_LEVEL asks otherwise) only warnings from the jobs' logs."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if "PRUNELAB_LOG_LEVEL" not in os.environ:
        logging.getLogger().setLevel(logging.WARNING)


def _status(args: argparse.Namespace) -> int:
    with _client(args.orchestrator) as client:
        if args.study_id:
            print(_job_table(_call(client.GetStudy, orchestrator_pb2.GetStudyRequest(study_id=args.study_id))))
            return EXIT_OK
        studies = _call(client.ListStudies, orchestrator_pb2.ListStudiesRequest()).studies
    if not studies:
        print("no studies yet; start one with: prunelab run STUDY.yaml")
    for study in studies:
        counts = study.counts
        print(f"{study.id:40} {study.state:9} {counts.done}/{counts.total} done, {counts.failed} failed, "
              f"{counts.running} running  {study.created_at.ToDatetime():%Y-%m-%d %H:%M}  {study.source}")
    return EXIT_OK


def _watch(args: argparse.Namespace) -> int:
    with _client(args.orchestrator) as client:
        return _follow(client, args.study_id, None, args.plain)


def _report(args: argparse.Namespace) -> int:
    with _client(args.orchestrator) as client:
        report = _call(client.GetReport, orchestrator_pb2.GetReportRequest(study_id=args.study_id))
    print(report.markdown)
    print(f"report: {report.report_dir}/report.md ({report.report.uri})", file=sys.stderr)
    if args.out:
        print(f"copied to {_save_files(report, args.out)}", file=sys.stderr)
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    with _client(args.orchestrator) as client:
        study = _call(client.CancelStudy, orchestrator_pb2.CancelStudyRequest(study_id=args.study_id))
    print(f"{study.id}: {study.state} ({study.counts.done} of {study.counts.total} jobs done)")
    return EXIT_OK


# ---- following a study


def _follow(client: Any, study_id: str, out: Path | None, plain: bool) -> int:
    """Show the study's jobs until it finishes (a live table on a terminal, else a line
    per job event), then where its report is."""
    study = None
    with _study_view(plain) as view:
        for study in _call(client.WatchStudy, orchestrator_pb2.WatchStudyRequest(study_id=study_id)):
            view.update(study)
    print(f"study {study.id}: {study.state}" + (f" ({study.error})" if study.error else ""))
    if study.HasField("report"):
        report = _call(client.GetReport, orchestrator_pb2.GetReportRequest(study_id=study_id))
        print(f"report: {report.report_dir}/report.md  (stored as {report.report.uri})")
        if out:
            print(f"copied to {_save_files(report, out)}")
    return EXIT_OK if study.state == "done" else EXIT_FAILED


def _study_view(plain: bool) -> contextlib.AbstractContextManager[Any]:
    from prunelab.cli.progress import StudyView, live_console

    console = None if plain else live_console()
    return contextlib.nullcontext(_EventPrinter()) if console is None else StudyView(console)


class _EventPrinter:
    """Lines for job state changes, retries, and a running job's progress now and then."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, str]] = {}
        self._last_progress: dict[str, float] = {}

    def update(self, study: orchestrator_pb2.Study) -> None:
        total = study.counts.total
        for job in study.jobs:
            before = self._seen.get(job.id)
            self._seen[job.id] = (job.state, job.message)
            finished = study.counts.done + study.counts.failed + study.counts.cancelled
            prefix = f"[{finished:>{len(str(total))}}/{total}]"
            if before is None and job.state != "running":
                continue  # queued, or finished before this run (the "already done" count says how many)
            if before is None or before[0] != job.state:
                print(f"{prefix} {job.state:9} {job.key}{_outcome(job)}", flush=True)
                self._last_progress[job.id] = time.monotonic()
            elif job.state == "running" and job.message != before[1] and self._due(job.id, job.message):
                print(f"{prefix} {'':9} {job.key}: {job.fraction:4.0%} {job.message}", flush=True)

    def _due(self, job_id: str, message: str) -> bool:
        """Retries always show; ordinary progress at most every PROGRESS_EVERY_S per job."""
        now = time.monotonic()
        if "retrying" in message or now - self._last_progress.get(job_id, 0.0) >= PROGRESS_EVERY_S:
            self._last_progress[job_id] = now
            return True
        return False


def _outcome(job: orchestrator_pb2.Job) -> str:
    if job.state == "done":
        return f" (reused {job.cached_from})" if job.cached_from else f" ({job.duration_seconds:.1f} s)"
    if job.state in ("failed", "cancelled") and job.error:
        return f": {job.error}"
    return ""


def _job_table(study: orchestrator_pb2.Study) -> str:
    counts = study.counts
    lines = [f"{study.id}  {study.state}  {counts.done}/{counts.total} done ({counts.cached} reused), "
             f"{counts.running} running, {counts.failed} failed, {counts.cancelled} cancelled"]
    lines += [f"  note: {note}" for note in study.notes]
    for job in study.jobs:
        detail = job.error or (f"{job.fraction:4.0%} {job.message}" if job.state == "running" else _outcome(job).strip(" ()"))
        lines.append(f"  {job.state:9} x{job.attempts}  {job.key:52}  {detail}")
    if study.error:
        lines.append(f"  error: {study.error}")
    if study.report_dir:
        lines.append(f"  report: {study.report_dir}/report.md")
    return "\n".join(lines)


def _print_submitted(response: orchestrator_pb2.SubmitStudyResponse) -> None:
    study = response.study
    verb = "resuming" if response.resumed else "submitted"
    print(f"{verb} study {study.id}: {study.counts.total} jobs ({study.counts.done} already done)", flush=True)
    for note in study.notes:
        print(f"note: {note}")


def _save_files(report: orchestrator_pb2.GetReportResponse, folder: Path) -> Path:
    """Write the report's files into `folder`; names come from the server, so each must
    stay inside it (no absolute path, no '..', no symlink out), checked before any is written."""
    from prunelab.store.manifest import safe_relative_path

    root = folder.resolve()
    targets = [(root / safe_relative_path(item.name), item.content) for item in report.files]
    for target, _ in targets:
        if not target.resolve().is_relative_to(root):
            raise errors.IntegrityError(f"report file {target.relative_to(root)} would be written outside {folder}", field="name")
    for target, content in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return folder


# ---- clients


class LocalClient:
    """An in-process servicer with the stub's calling convention."""

    def __init__(self, servicer: Any):
        self._servicer = servicer

    def __getattr__(self, name: str) -> Any:
        from prunelab.rpc import call_in_process

        method = getattr(self._servicer, name)
        return lambda request: call_in_process(method, request)


@contextlib.contextmanager
def _client(target: str | None) -> Iterator[Any]:
    """The deployment's orchestrator at `target`, or this machine's database."""
    if target:
        from prunelab.rpc import make_channel
        from prunelab.v1.orchestrator_pb2_grpc import OrchestratorStub

        with make_channel(target) as channel:
            yield OrchestratorStub(channel)
        return
    from prunelab.orchestrate.service import OrchestratorServicer
    from prunelab.orchestrate.state import StudyDB

    db = StudyDB(settings().orchestrator_db)
    try:
        yield LocalClient(OrchestratorServicer(db))
    finally:
        db.close()


def _call(method: Any, request: Any) -> Any:
    """A call (unary, or a stream to iterate) whose failure becomes the domain error the CLI reports."""
    try:
        response = method(request)
    except grpc.RpcError as error:
        raise _domain_error(error) from None
    return _converted(response) if isinstance(response, Iterator) else response


def _converted(responses: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from responses
    except grpc.RpcError as error:
        raise _domain_error(error) from None


def _domain_error(error: grpc.RpcError) -> errors.PrunelabError:
    return errors.error_class(error.code().name)(error.details())
