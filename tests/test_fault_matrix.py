"""The fault matrix (`pytest -m faults`): the local cluster (deploy/local/cluster.py, every
service its own process, SeaweedFS as the S3 store) runs one small study (prune, LoRA,
perplexity, profile) while a fault is injected. Each row checks that the study completes
with results identical to an undisturbed run's (every measurement, the pruned and tuned
weights byte for byte; not times or memory) and that every artifact in the store reads
back whole (`ArtifactStore.audit`).

- SIGKILL of each worker kind (pruner, tuner, evaluator, profiler) mid-job, 0, 1.5 and 3 s
  after it started the job (and the job must be started again: a cut-off call is re-sent
  by the orchestrator, or by gRPC's own retry when no answer had come back yet), and of
  the orchestrator at 0, 40 and 75 % of the jobs done;
  the killed process is started again as a container's restart policy would (`restart`);
- the S3 server stopped for 30 s while a prune job runs, so the job's upload (and the
  evaluators' reads and writes) fall in the outage, then restarted on its data;
- a pruner whose scratch space (TMPDIR) is a 256 KiB file system: the prune fails with
  DiskFull at once, leaving nothing there or in the store; with room again, the same
  study resumes and completes;
- an evaluator replica stopped with SIGSTOP mid-job: the orchestrator's watchdog
  (PRUNELAB_JOB_STALL_TIMEOUT_S) gives up on the call and the job completes elsewhere.

The first evaluator kill, the full disk and the hung worker run in `make test`; the other
trials and the outage are `slow` (make test-slow). Each trial's study reads its own copy
of the model and text (same bytes, new files), so no job is served from an earlier
trial's results: every job of every trial really runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from test_deploy_local import cluster as local_cluster
from test_orchestrate import wait_for, write_text

from prunelab.cli import main as cli_main
from prunelab.config import settings
from prunelab.orchestrate import load_study
from prunelab.rpc import make_channel
from prunelab.store import open_store
from prunelab.store.manifest import sha256_file
from prunelab.v1 import orchestrator_pb2
from prunelab.v1.orchestrator_pb2_grpc import OrchestratorStub

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

STALL_TIMEOUT_S = 15  # the cluster's watchdog; every job here reports progress far more often
STUDY_TIMEOUT_S = 900
OUTAGE_S = 30
# Where a kill lands: seconds after a worker logs that it started the job (each job killed
# here runs 4.5 to 12 s on two idle cores), and shares of the study's jobs done for the orchestrator.
KILL_AFTER_S = (0.0, 1.5, 3.0)
KILL_AT_DONE = (0.0, 0.4, 0.75)
SAMPLES, WINDOWS, REPEATS = 2048, 2000, 60  # calibration samples, perplexity windows, profiler repeats
SERVICE_OF_KIND = {"prune": "pruner", "tune": "tuner", "evaluate": "evaluator", "profile": "profiler"}
# what a rerun changes by itself: times, memory, bookkeeping, records of when and by which job
VOLATILE_TABLES = {"jobs", "table_timing", "measurements"}
VOLATILE_COLUMN = re.compile(r"( s|ms|tok/s|speedup|MiB|Memory %|Checkpoint sha256)$")


@dataclass
class Trial:
    """One run of the matrix's study: its id, folder and, once finished, what it produced."""

    study_id: str
    folder: Path
    submitted: float = field(default_factory=time.monotonic)
    seconds: float = 0.0  # from submission to the study's end
    study: orchestrator_pb2.Study | None = None
    results: dict | None = None


@pytest.fixture(scope="module")
def faults_cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("faults-cluster")
    with pytest.MonkeyPatch.context() as patch:  # inherited by every process, restarted ones included
        patch.setenv("PRUNELAB_JOB_STALL_TIMEOUT_S", str(STALL_TIMEOUT_S))
        running = local_cluster.up(state_dir, orchestrator_port=0)
        try:
            yield running
        finally:
            for process in running.processes:  # a test that failed midway may leave one stopped
                if (handle := process.handle()) is not None:
                    handle.resume()
            local_cluster.down(state_dir)


def store_of(cluster: local_cluster.Cluster, cache: Path):
    """The cluster's store as a client with the full key sees it, through a cache of its
    own (so that reading an artifact reads the store)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**cluster.store_env, "PRUNELAB_CACHE": str(cache)}.items():
            patch.setenv(key, value)
        settings.cache_clear()
        store = open_store()
    settings.cache_clear()
    return store


@pytest.fixture
def cluster_store(faults_cluster, tmp_path):
    return store_of(faults_cluster, tmp_path / "client-cache")


@pytest.fixture(scope="module")
def reference(faults_cluster, tiny_checkpoint, tmp_path_factory) -> Trial:
    """The study undisturbed: what every row must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    trial = submit(faults_cluster, tiny_checkpoint, folder)
    return finish(faults_cluster, trial, store_of(faults_cluster, folder / "client-cache"))


def study_document(model: Path, text: Path) -> dict:
    """Every job lasts seconds on the tiny model, so that a kill point lands inside it."""
    return {
        "name": "faults",
        "model": str(model),
        "calibration": {"dataset": str(text), "samples": SAMPLES, "seq_len": 64},
        "pruning": {"methods": ["taylor"], "ratios": [0.2], "layers": ["1:3"]},
        "tuning": {"select": [{"method": "taylor"}],
                   "settings": {"data": str(text), "steps": 300, "eval_every": 100, "max_length": 16, "batch_size": 2,
                                "max_val_examples": 4}},
        "evaluation": {"perplexity": {"corpora": [str(text)], "seq_lens": [4, 8], "max_windows": WINDOWS}, "batch_size": 1},
        "profiling": {"seq_len": 8, "batch_sizes": [1], "gen_tokens": 32, "repeats": REPEATS, "warmup": 0, "skip_memory": True},
    }


def submit(cluster: local_cluster.Cluster, checkpoint: Path, folder: Path) -> Trial:
    """The matrix's study on fresh copies of the model and text in `folder`, submitted."""
    model = Path(shutil.copytree(checkpoint, folder / "model"))
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study_document(model, write_text(folder / "text", count=3000))))
    assert cli_main(["run", str(path), "--orchestrator", cluster.orchestrator, "--detach"]) == 0
    return Trial(load_study(path).id, folder)


def get_study(cluster: local_cluster.Cluster, study_id: str) -> orchestrator_pb2.Study | None:
    """The study as the orchestrator reports it; None while the orchestrator is down."""
    try:
        with make_channel(cluster.orchestrator) as channel:
            return OrchestratorStub(channel).GetStudy(orchestrator_pb2.GetStudyRequest(study_id=study_id), timeout=10)
    except grpc.RpcError:
        return None


def finish(cluster: local_cluster.Cluster, trial: Trial, store, state: str = "done") -> Trial:
    """Wait until the trial's study ends; check it ended `state`; its results when done."""
    ended = wait_for(lambda: (s := get_study(cluster, trial.study_id)) is not None and s.state in ("done", "failed", "cancelled") and s,
                     f"study {trial.study_id} to end", timeout=STUDY_TIMEOUT_S)
    assert ended.state == state, [(job.key, job.state, job.error) for job in ended.jobs]
    trial.study, trial.seconds = ended, time.monotonic() - trial.submitted
    if state == "done":
        with make_channel(cluster.orchestrator) as channel:
            report = OrchestratorStub(channel).GetReport(orchestrator_pb2.GetReportRequest(study_id=trial.study_id))
        files = {f.name: f.content.decode() for f in report.files if f.name.endswith((".json", ".csv"))}
        trial.results = comparable(files, trial.folder, store)
    return trial


def comparable(files: dict[str, str], folder: Path, store) -> dict:
    """The report's numbers that a rerun of the same work must reproduce exactly: every
    measurement, every table without its times and memory, and the sha256 of each
    measured checkpoint's weights (its artifact digest also covers the creation time)."""
    measured = {}
    for row in csv.DictReader(io.StringIO(files["measurements.csv"])):
        checkpoint = row.pop("checkpoint_sha256")
        weights = checkpoint if row["role"] == "base" else weights_sha256(store, checkpoint)
        row.pop("evaluation")  # the evaluation record's artifact: it holds the job id and a timestamp
        measured[(row["model"], row["measure"], row["seq_len"])] = {**row, "weights": weights}
    tables = {
        name: [[cell for column, cell in zip(table["columns"], row, strict=True) if not VOLATILE_COLUMN.search(column)]
               for row in table["rows"]]
        for name, table in json.loads(files["report.json"])["tables"].items() if name not in VOLATILE_TABLES
    }
    return json.loads(json.dumps({"measurements": sorted(measured.items()), "tables": tables}).replace(str(folder), "TRIAL"))


def weights_sha256(store, digest: str) -> dict[str, str]:
    folder = store.get_dir(digest)
    return {path.name: sha256_file(path) for path in sorted(folder.glob("*.safetensors"))}


# ---- injecting faults


def running_job(cluster: local_cluster.Cluster, trial: Trial, kind: str) -> tuple[orchestrator_pb2.Job, local_cluster.Process]:
    """A `kind` job of the trial on its first attempt, and the process that has started it
    (its log says so); a pruned model's measurement, not the base model's, which is over
    too soon on the tiny model."""
    def started():
        study = get_study(cluster, trial.study_id)
        if study is not None and study.state in ("done", "failed", "cancelled"):
            raise AssertionError(f"the study ended before a {kind} job was seen running")
        jobs = [job for job in (study.jobs if study else []) if job.kind == kind and job.state == "running"
                and job.attempts == 1 and (job.needs or kind == "prune")]
        workers = [p for p in current_processes(cluster) if p.service == SERVICE_OF_KIND[kind]]
        return next(((job, worker) for job in jobs for worker in workers if starts(worker, job)), None)
    return wait_for(started, f"a {kind} job to start", timeout=STUDY_TIMEOUT_S)


def starts(worker: local_cluster.Process, job: orchestrator_pb2.Job) -> int:
    """How often `worker` (any of its restarts: one log) has started `job`."""
    return Path(worker.log).read_text(errors="replace").count(f"[job={job.id}] {job.kind}-{job.id}: started on this replica")


def times_started(cluster: local_cluster.Cluster, job: orchestrator_pb2.Job) -> int:
    """How often any worker started `job`: a job cut off before its first answer is sent
    again by the channel's own retry (UNAVAILABLE), unseen by the orchestrator's count."""
    return sum(starts(worker, job) for worker in current_processes(cluster) if worker.service == SERVICE_OF_KIND[job.kind])


def current_processes(cluster: local_cluster.Cluster) -> list[local_cluster.Process]:
    """The processes as state.json records them now (a restarted one has a new pid)."""
    return local_cluster.Cluster.load(Path(cluster.state_dir)).processes


def stop(cluster: local_cluster.Cluster, name: str) -> None:
    """SIGTERM to process `name`, and wait until it has exited."""
    handle = next(p for p in current_processes(cluster) if p.name == name).handle()
    handle.terminate()
    handle.wait(60)


def kill_and_restart(cluster: local_cluster.Cluster, process: local_cluster.Process) -> None:
    handle = process.handle()
    assert handle is not None, f"{process.name} is not running"
    handle.send_signal(signal.SIGKILL)
    handle.wait(30)
    local_cluster.restart(Path(cluster.state_dir), process.name)


def study_fraction_done(cluster: local_cluster.Cluster, trial: Trial, at: float) -> list[str]:
    """Wait until `at` of the trial's jobs are done and at least one runs; the running ones' ids."""
    def ready():
        study = get_study(cluster, trial.study_id)
        if study is None or study.counts.done < at * study.counts.total:
            return None
        return [job.id for job in study.jobs if job.state == "running" and job.message] or None
    return wait_for(ready, f"{at:.0%} of the study done", timeout=STUDY_TIMEOUT_S)


def attempts(trial: Trial, job_id: str) -> int:
    return next(job.attempts for job in trial.study.jobs if job.id == job_id)


def check_like_reference(trial: Trial, reference: Trial, store, row: str, note: str) -> None:
    """The trial ended like the reference and the store is whole; one line for the matrix's table (pytest -s)."""
    assert trial.study.counts.done == trial.study.counts.total == reference.study.counts.total
    assert trial.results == reference.results
    audit = store.audit()
    assert audit.damaged == {} and audit.verified
    print(f"\nFAULT MATRIX | {row} | {trial.study.counts.done}/{trial.study.counts.total} jobs done | identical to the reference "
          f"| {len(audit.verified)} artifacts verified, {len(audit.orphans)} orphans | {note} | "
          f"{trial.seconds:.0f} s (reference {reference.seconds:.0f} s)")


# ---- the rows


def kill_trial(cluster, checkpoint, folder, reference, store, kind: str, point: int) -> None:
    trial = submit(cluster, checkpoint, folder)
    if kind == "orchestrator":
        interrupted = study_fraction_done(cluster, trial, KILL_AT_DONE[point])
        kill_and_restart(cluster, next(p for p in current_processes(cluster) if p.name == "orchestrator"))
        finish(cluster, trial, store)
        retried = [job_id for job_id in interrupted if attempts(trial, job_id) > 1]
        assert retried, "no running job was cut off by the kill"
        note = f"{len(retried)} running job(s) dispatched again"
        row = f"SIGKILL orchestrator at {KILL_AT_DONE[point]:.0%} of the jobs done"
    else:
        job, process = running_job(cluster, trial, kind)
        time.sleep(KILL_AFTER_S[point])
        kill_and_restart(cluster, process)
        finish(cluster, trial, store)
        assert times_started(cluster, job) > 1, f"{job.key} finished before the kill"
        note = f"{job.key.split(' /')[0]}: started {times_started(cluster, job)} times, {attempts(trial, job.id)} dispatches"
        row = f"SIGKILL {SERVICE_OF_KIND[kind]} {KILL_AFTER_S[point]:g} s into a {kind} job"
    check_like_reference(trial, reference, store, row, note)


def test_an_evaluator_killed_mid_job_costs_a_retry_not_a_result_and_the_run_matches_the_embedded_one(
        faults_cluster, reference, cluster_store, tiny_checkpoint, tmp_path, capsys):
    kill_trial(faults_cluster, tiny_checkpoint, tmp_path, reference, cluster_store, "evaluate", 1)
    # the reference study again, embedded: one process and this test's local store; the same numbers
    assert cli_main(["run", str(reference.folder / "study.yaml")]) == 0
    capsys.readouterr()
    embedded = csv.DictReader(io.StringIO((settings().home / "reports" / reference.study_id / "measurements.csv").read_text()))
    embedded_ppl = {(row["model"], row["measure"], row["seq_len"]): float(row["value"]) for row in embedded if row["measure"] == "ppl"}
    ppl = {tuple(key): float(row["value"]) for key, row in reference.results["measurements"] if row["measure"] == "ppl"}
    assert ppl.keys() == embedded_ppl.keys() and len(ppl) == 6
    for key, value in embedded_ppl.items():
        assert math.isclose(ppl[key], value, rel_tol=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("point", [0, 1, 2], ids=["early", "middle", "late"])
@pytest.mark.parametrize("kind", ["prune", "tune", "evaluate", "profile", "orchestrator"])
def test_a_killed_process_costs_a_retry_not_a_result(faults_cluster, reference, cluster_store, tiny_checkpoint, tmp_path, kind, point):
    kill_trial(faults_cluster, tiny_checkpoint, tmp_path, reference, cluster_store, kind, point)


@pytest.mark.slow
def test_a_store_stopped_for_30_s_mid_upload_costs_time_not_a_retry(faults_cluster, reference, cluster_store, tiny_checkpoint, tmp_path):
    trial = submit(faults_cluster, tiny_checkpoint, tmp_path)
    prune, _ = running_job(faults_cluster, trial, "prune")
    time.sleep(KILL_AFTER_S[1])  # the job has opened the store: an outage from here on delays it, never fails it
    stop(faults_cluster, "seaweedfs")
    time.sleep(OUTAGE_S)
    local_cluster.restart(Path(faults_cluster.state_dir), "seaweedfs")
    finish(faults_cluster, trial, cluster_store)
    prune_done = next(job for job in trial.study.jobs if job.id == prune.id)
    assert prune_done.attempts == 1, "the prune job was dispatched again instead of waiting for the store"
    assert prune_done.duration_seconds >= OUTAGE_S, "the prune job's upload did not fall in the outage"
    check_like_reference(trial, reference, cluster_store, f"S3 stopped {OUTAGE_S} s",
                         f"prune: 1 attempt, {prune_done.duration_seconds:.0f} s")


def test_a_full_scratch_disk_fails_the_prune_at_once_and_leaves_nothing_behind(
        faults_cluster, reference, cluster_store, tiny_checkpoint, tmp_path, small_filesystem):
    scratch = small_filesystem(256 * 1024)  # the pruned tiny checkpoint is about 600 KiB
    state_dir = Path(faults_cluster.state_dir)
    stop(faults_cluster, "pruner")
    local_cluster.restart(state_dir, "pruner", extra_env={"TMPDIR": str(scratch)})
    before = cluster_store.audit()

    trial = finish(faults_cluster, submit(faults_cluster, tiny_checkpoint, tmp_path), cluster_store, state="failed")
    prune = next(job for job in trial.study.jobs if job.kind == "prune")
    assert prune.attempts == 1 and prune.error.startswith("RESOURCE_EXHAUSTED: no space left on the worker's disk"), prune.error
    for job in trial.study.jobs:  # what needs the pruned model failed with it; the base model's measurements did not
        assert job.state == ("failed" if job.kind == "prune" or job.needs else "done"), job.key
    assert list(scratch.iterdir()) == []
    after = cluster_store.audit()
    assert after.damaged == {} and after.orphans == before.orphans
    assert not [ref for ref in after.verified if ref.kind == "model" and ref not in before.verified]

    # room again: the same study, submitted again, re-runs what failed and ends like the reference
    stop(faults_cluster, "pruner")
    local_cluster.restart(state_dir, "pruner")
    trial.submitted = time.monotonic()
    assert cli_main(["run", str(tmp_path / "study.yaml"), "--orchestrator", faults_cluster.orchestrator, "--detach"]) == 0
    check_like_reference(finish(faults_cluster, trial, cluster_store), reference, cluster_store, "full scratch disk (256 KiB)",
                         "prune failed at once with DiskFull, nothing left; resubmitted with room")


def test_a_hung_evaluator_is_given_up_on_by_the_watchdog_and_its_job_completes_elsewhere(
        faults_cluster, reference, cluster_store, tiny_checkpoint, tmp_path):
    trial = submit(faults_cluster, tiny_checkpoint, tmp_path)
    job, process = running_job(faults_cluster, trial, "evaluate")
    hung = process.handle()
    time.sleep(KILL_AFTER_S[1])
    hung.suspend()  # SIGSTOP: its connections stay up, it answers nothing
    try:
        finish(faults_cluster, trial, cluster_store)
    finally:
        hung.resume()
    assert attempts(trial, job.id) > 1  # the watchdog's doing: the orchestrator dispatched it again
    check_like_reference(trial, reference, cluster_store, f"SIGSTOP evaluator (watchdog {STALL_TIMEOUT_S} s)",
                         f"{job.key.split(' /')[0]}: {attempts(trial, job.id)} dispatches")
