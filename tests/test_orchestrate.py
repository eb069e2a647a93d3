"""The orchestrator on tiny models, for real: a study end to end through `prunelab run`
(every servicer in-process, real SQLite, the local store) down to its report;
results of identical jobs reused across studies; cancellation from another
process; jobs re-dispatched while their gRPC service is down, after it comes back
and after it dies mid-stream; an orchestrator process SIGKILLed mid-study resumes
without redoing finished jobs."""

from __future__ import annotations

import csv
import json
import os
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from fixtures.evaluate import fixture_file

from prunelab.cli import main as cli_main
from prunelab.config import settings
from prunelab.data import import_dataset
from prunelab.errors import Unavailable
from prunelab.evaluate.service import SERVICE_NAME as EVALUATOR
from prunelab.evaluate.service import EvaluatorServicer
from prunelab.evaluate.service import registration as evaluator_registration
from prunelab.orchestrate import GrpcDispatcher, InProcessDispatcher, Orchestrator, RetryPolicy, StudyDB, load_study, parse_study
from prunelab.orchestrate.graph import EVALUATE, PRUNE
from prunelab.orchestrate.service import SERVICE_NAME as ORCHESTRATOR
from prunelab.orchestrate.state import FINAL_STATES, JobRow
from prunelab.rpc import check_health, make_channel
from prunelab.store import open_store
from prunelab.store.seaweed import free_ports
from prunelab.v1 import orchestrator_pb2
from prunelab.v1.orchestrator_pb2_grpc import OrchestratorStub

REPO = Path(__file__).resolve().parent.parent
TINY_STUDY = Path(__file__).parent / "fixtures" / "studies" / "tiny.yaml"
WORDS = "the quick brown fox jumps over the lazy dog while pruning removes heads and channels from every layer".split()
FAST_RETRY = RetryPolicy(initial_s=0.1, multiplier=2.0, max_s=0.5, max_failures=1000)
DEADLINE_S = 240.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_text(folder: Path, count: int = 300) -> Path:
    """train/validation text: `count` lines of 12 words, varied so that windows differ."""
    folder.mkdir()
    lines = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(count)]
    for split in ("train", "validation"):
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def tiny_study_text(model: Path, text: Path, **changes) -> str:
    """The tiny study on `model` and `text`, its top-level sections replaced by `changes` (None drops one)."""
    document = {**yaml.safe_load(string.Template(TINY_STUDY.read_text()).substitute(MODEL=model, TEXT=text)), **changes}
    return yaml.safe_dump({key: value for key, value in document.items() if value is not None})


@pytest.fixture
def text_dir(tmp_path) -> Path:
    return write_text(tmp_path / "text")


@pytest.fixture
def study_yaml(tiny_checkpoint, text_dir) -> Callable[..., str]:
    """`study_yaml(**top_level_changes)`: the tiny study's text."""
    return lambda **changes: tiny_study_text(tiny_checkpoint, text_dir, **changes)


def ppl_only(text_dir: Path, **perplexity) -> dict:
    """Perplexity alone; by default on 50 windows of 8 tokens (a fraction of a second)."""
    return {"perplexity": {"corpora": [str(text_dir)], "seq_lens": [8], "max_windows": 50, **perplexity}}


def wait_for(condition: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finished(db: StudyDB, study_id: str) -> list[JobRow]:
    wait_for(lambda: db.study(study_id).state in FINAL_STATES, f"study {study_id} to finish")
    return db.jobs(study_id)


@pytest.fixture
def orchestrator(request) -> Iterator[Callable[..., Orchestrator]]:
    """`orchestrator(dispatcher, **kwargs)`: started on this test's database, stopped after."""
    started = []

    def start(dispatcher, **kwargs) -> Orchestrator:
        running = Orchestrator(StudyDB(settings().orchestrator_db), dispatcher, **kwargs)
        running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
        running.db.close()


# ---- end to end, in-process, through the CLI


def test_prunelab_run_takes_a_study_to_a_report_with_every_table(study_yaml, text_dir, tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(study_yaml())
    study_id = load_study(path).id

    # no task data in the store: the task is skipped, and the report says how to add it
    assert cli_main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"submitted study {study_id}: 11 jobs" in out and "tasks skipped, their data is not in the store or $PRUNELAB_DATA_DIR/tasks/ and the hub cannot be reached: arc_easy" in out
    assert "done      prune taylor 20%" in out and f"study {study_id}: done" in out
    assert "prunelab data import TASK PATH.jsonl" in (settings().home / "reports" / study_id / "report.md").read_text()

    # the data imported, the same command adds the task's jobs and redoes nothing else
    import_dataset("arc_easy", fixture_file("arc_easy"))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "copy")]) == 0
    out = capsys.readouterr().out
    assert f"resuming study {study_id}: 15 jobs (11 already done)" in out
    done_lines = [line.split("] done ", 1)[1].strip() for line in out.splitlines() if line.startswith("[") and "] done " in line]
    assert sorted(line.rsplit(" (", 1)[0] for line in done_lines) == sorted(
        f"evaluate {model} task arc_easy" for model in ("base", "l2 20%", "taylor 20%", "taylor 20% +LoRA"))

    folder = settings().home / "reports" / study_id
    assert f"report: {folder}/report.md" in out
    markdown = (folder / "report.md").read_text()
    assert "tasks skipped" not in markdown
    for title in ("Table 2 — the base model", "Table 3 — parameters removed", "Table 4 — quality",
                  "Table 5 — zero-shot accuracy, acc", "Table 6 — zero-shot accuracy, acc_norm", "Recovery: tuning runs",
                  "Table 7 — parameters, MACs, memory, latency", "Timing", "![ppl_vs_params.png]"):
        assert title in markdown, title
    for name in ("ppl_vs_params.png", "accuracy_vs_params.png", "tuning_curves.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "copy" / name).read_bytes() == (folder / name).read_bytes()

    quality = {row["Model"]: row for row in csv.DictReader(open(folder / "table4_quality.csv"))}
    assert list(quality) == ["base", "l2 20%", "taylor 20%", "taylor 20% +LoRA"]
    for row in quality.values():
        assert float(row[f"PPL {text_dir}@8"]) > 1 and 0 <= float(row["arc_easy acc"]) <= 1
    for metric in ("acc", "acc_norm"):  # one task: the mean is its score, the mean's stderr the task's
        table = list(csv.DictReader(open(folder / f"table{5 if metric == 'acc' else 6}_{metric}.csv")))
        assert [row["Model"] for row in table] == ["base", "l2 20%", "taylor 20%", "taylor 20% +LoRA"]
        assert all(row["Mean"] == row["arc_easy"] and 0 <= float(row["Mean ± (stderr)"]) < 0.5 for row in table), table
    assert "Tasks: lm-eval 0.4" in markdown and "-shot, the first" in markdown and "one task's stderr is up to ±" in markdown
    params = list(csv.DictReader(open(folder / "table3_params.csv")))
    assert [abs(float(row["Got % (whole model)"]) - 20) < 0.5 for row in params] == [True, True]
    tuning = next(csv.DictReader(open(folder / "table_tuning.csv")))
    assert all(float(tuning[column]) > 1 for column in ("Held-out PPL before", "Held-out PPL after", "Selection PPL before"))
    assert len(list(csv.DictReader(open(folder / "table7_efficiency.csv")))) == 4

    measurements = list(csv.DictReader(open(folder / "measurements.csv")))
    assert sorted(row["measure"] for row in measurements) == ["acc"] * 4 + ["ppl"] * 4
    for row in measurements:  # provenance on every number
        assert len(row["checkpoint_sha256"]) == 64 and row["evaluation"].startswith("artifact://")
        if row["measure"] == "ppl":
            assert (row["seq_len"], row["split"], len(row["dataset_sha256"])) == ("8", "validation", 64) and int(row["windows"]) > 0
        else:
            assert row["lm_eval_version"] and (row["n"], row["num_fewshot"]) == ("4", "0")
    document = json.loads((folder / "report.json").read_text())
    stored = open_store().get_ref(f"reports/{study_id}")
    assert open_store().stat(stored.uri).kind == "report"
    assert (open_store().get_dir(stored.uri) / "report.md").read_text() == markdown
    assert document["study"]["id"] == study_id

    # the same file again: nothing is redone, the report is printed again
    attempts = sum(job.attempts for job in StudyDB(settings().orchestrator_db).jobs(study_id))
    assert cli_main(["run", str(path)]) == 0
    assert f"resuming study {study_id}: 15 jobs (15 already done)" in capsys.readouterr().out
    assert sum(job.attempts for job in StudyDB(settings().orchestrator_db).jobs(study_id)) == attempts == 15

    assert cli_main(["status"]) == 0 and study_id in capsys.readouterr().out
    assert cli_main(["status", study_id]) == 0 and "done      x1  tune taylor 20% +LoRA" in capsys.readouterr().out
    assert cli_main(["report", study_id]) == 0 and capsys.readouterr().out.startswith("# Study tiny")


def test_a_study_with_export_gguf_publishes_one_gguf_per_model_that_artifact_get_fetches(study_yaml, tmp_path, capsys):
    import gguf

    path = tmp_path / "tiny.yaml"
    path.write_text(study_yaml(evaluation=None, profiling=None, tuning=None, export="gguf"))
    study_id = load_study(path).id

    assert cli_main(["run", str(path)]) == 0
    jobs = StudyDB(settings().orchestrator_db).jobs(study_id)
    assert sorted(job.key for job in jobs if job.kind == "export") == ["export base", "export l2 20%", "export taylor 20%"]
    assert all(job.state == "done" for job in jobs)
    exports = list(csv.DictReader(open(settings().home / "reports" / study_id / "table_exports.csv")))
    assert [(row["Model"], row["Type"]) for row in exports] == [("base", "f16"), ("taylor 20%", "f16"), ("l2 20%", "f16")]
    assert exports[0]["Architecture"] == "llama"
    pruned = exports[1]
    assert pruned["Architecture"] == "deci"  # layers 1:3 pruned, 0 and 3 whole: per-layer widths
    capsys.readouterr()
    assert cli_main(["artifact", "get", pruned["Artifact"], "--out", str(tmp_path / "fetched")]) == 0
    reader = gguf.GGUFReader(tmp_path / "fetched" / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "deci"
    assert open_store().stat(pruned["Artifact"]).kind == "gguf"


# ---- reuse, cancellation


def test_identical_jobs_of_a_later_study_reuse_earlier_results(orchestrator, study_yaml, text_dir):
    running = orchestrator(InProcessDispatcher((PRUNE, EVALUATE)))
    first = parse_study(study_yaml(name="first", tuning=None, profiling=None, evaluation=ppl_only(text_dir)), "first.yaml")
    second = parse_study(study_yaml(name="second", tuning=None, profiling=None, evaluation=ppl_only(text_dir),
                                    pruning={"methods": ["taylor", "l2"], "ratios": [0.2, 0.3], "layers": ["1:3"]}), "second.yaml")
    first_jobs = {job.key: job for job in finished(running.db, running.submit(first, "first.yaml")[0])}
    second_jobs = finished(running.db, running.submit(second, "second.yaml")[0])

    reused = [job for job in second_jobs if job.cached_from]
    executed = [job for job in second_jobs if job.attempts]
    assert {job.key for job in reused} == set(first_jobs)  # base evaluation, both 20 % prunes and their evaluations
    assert {job.key for job in executed} == {"prune taylor 30%", f"evaluate taylor 30% ppl {text_dir}@8",
                                             "prune l2 30%", f"evaluate l2 30% ppl {text_dir}@8"}
    for job in reused:
        assert job.state == "done" and job.attempts == 0 and job.result == first_jobs[job.key].result
        assert job.cached_from == first_jobs[job.key].id


def test_a_name_whose_content_changed_is_not_served_from_the_cache(orchestrator, study_yaml, text_dir):
    """The same study again after the calibration and evaluation text changed under its
    name: the cache keys on content (orchestrate/content.py), so every job runs again."""
    running = orchestrator(InProcessDispatcher((PRUNE, EVALUATE)))
    study = lambda name: parse_study(study_yaml(name=name, tuning=None, profiling=None, evaluation=ppl_only(text_dir)), f"{name}.yaml")  # noqa: E731
    first = finished(running.db, running.submit(study("before"), "before.yaml")[0])
    for split in ("train", "validation"):
        (text_dir / f"{split}.txt").write_text("\n".join(" ".join(["other"] * 12) for _ in range(300)) + "\n")
    second = finished(running.db, running.submit(study("after"), "after.yaml")[0])
    evaluations = [job for job in second if job.kind == EVALUATE]
    assert evaluations and not any(job.cached_from for job in second), "a result on the old text was reused"
    assert {job.inputs_hash for job in first}.isdisjoint(job.inputs_hash for job in second)


def test_cancel_from_another_process_stops_the_running_job_and_drops_the_pending_ones(orchestrator, study_yaml, text_dir, capsys):
    running = orchestrator(InProcessDispatcher((EVALUATE,)))
    slow = ppl_only(text_dir, seq_lens=[2, 3], max_windows=None)  # thousands of windows of 2-3 tokens: seconds per job
    study = parse_study(study_yaml(pruning=None, tuning=None, profiling=None, evaluation={**slow, "batch_size": 1}), "slow.yaml")
    study_id, _ = running.submit(study, "slow.yaml")
    wait_for(lambda: any(job.state == "running" and job.fraction > 0 for job in running.db.jobs(study_id)), "a job to run")

    assert cli_main(["cancel", study_id]) == 0  # its own connection to the database, as another process has
    assert f"{study_id}: cancelled" in capsys.readouterr().out
    jobs = wait_for(lambda: (jobs := running.db.jobs(study_id)) and all(job.state == "cancelled" for job in jobs) and jobs,
                    "every job to be cancelled", timeout=60)
    assert [job.attempts for job in jobs] == [1, 0]
    assert running.db.study(study_id).state == "cancelled"


# ---- retries over real sockets


def test_a_job_waits_for_its_service_and_is_redispatched_when_its_worker_dies_mid_stream(
    orchestrator, grpc_server, study_yaml, text_dir
):
    [port] = free_ports(1)
    running = orchestrator(GrpcDispatcher({EVALUATE: f"127.0.0.1:{port}"}), retry=FAST_RETRY)
    evaluation = {**ppl_only(text_dir, seq_lens=[2], max_windows=1000), "batch_size": 1}  # a few seconds
    study = parse_study(study_yaml(pruning=None, tuning=None, profiling=None, evaluation=evaluation), "retry.yaml")
    study_id, _ = running.submit(study, "retry.yaml")
    job = lambda: running.db.jobs(study_id)[0]  # noqa: E731

    wait_for(lambda: "waiting for the evaluator" in job().message, "the job to wait while nothing listens")
    assert job().state == "running" and job().attempts == 1  # not ready yet is no failed attempt

    server = grpc_server(evaluator_registration(EvaluatorServicer()), [EVALUATOR], port=port)
    wait_for(lambda: job().fraction > 0.3, "the evaluation to stream progress")
    attempts_before_death = job().attempts
    server.stop(None)  # the worker dies mid-stream: in-flight calls are cut

    wait_for(lambda: job().attempts > attempts_before_death, "a re-dispatch after the worker died")
    grpc_server(evaluator_registration(EvaluatorServicer()), [EVALUATOR], port=port)  # back on the same port
    [done] = finished(running.db, study_id)
    assert done.state == "done" and done.result["perplexity"][0]["windows"] == "1000"  # int64 is a string in JSON
    assert running.db.study(study_id).state == "done"


def test_a_killed_orchestrator_resumes_without_redoing_finished_jobs(study_yaml, tmp_path, capsys):
    [port] = free_ports(1)
    env = {**os.environ, "PRUNELAB_GRPC_PORT": str(port), "PRUNELAB_ORCHESTRATOR_MAX_PARALLEL": "1", "OMP_NUM_THREADS": "1",
           "PRUNELAB_LOG_LEVEL": "WARNING", "PRUNELAB_METRICS_PORT": "0"}
    pruning = {"methods": ["l2", "random"], "ratios": [0.2], "layers": ["1:3"]}
    # profiles as the work (no lm-eval to import): a few seconds each
    profiling = {"seq_len": 8, "batch_sizes": [1], "gen_tokens": 8, "repeats": 30, "warmup": 0, "skip_memory": True}
    text = study_yaml(tuning=None, evaluation=None, pruning=pruning, profiling=profiling)

    with _orchestrator_process(env, port, tmp_path / "first.log") as stub:
        study_id = stub.SubmitStudy(orchestrator_pb2.SubmitStudyRequest(study_yaml=text, source="kill.yaml")).study.id
        db = StudyDB(settings().orchestrator_db)
        wait_for(lambda: _count(db.jobs(study_id), "done") >= 2 and _count(db.jobs(study_id), "running"), "2 jobs done, 1 running")
        stub.kill()
    before = {job.id: job for job in db.jobs(study_id)}
    done_before = [job for job in before.values() if job.state == "done"]
    interrupted = [job for job in before.values() if job.state == "running"]
    assert len(interrupted) == 1 and all(job.attempts == 1 for job in done_before)

    with _orchestrator_process(env, port, tmp_path / "second.log") as stub:
        watched = list(stub.WatchStudy(orchestrator_pb2.WatchStudyRequest(study_id=study_id), timeout=DEADLINE_S))
        # the CLI against the deployment
        assert cli_main(["report", study_id, "--orchestrator", f"127.0.0.1:{port}", "--out", str(tmp_path / "report")]) == 0
        assert (tmp_path / "report" / "table7_efficiency.csv").is_file()
    assert watched[-1].state == "done" and watched[-1].counts.done == len(before) == 5
    after = {job.id: job for job in db.jobs(study_id)}
    for job in done_before:  # not redone: same attempt, same result, same finish time
        assert (after[job.id].attempts, after[job.id].finished_at, after[job.id].result) == (1, job.finished_at, job.result)
    assert after[interrupted[0].id].attempts == 2  # re-queued at restart, run again
    assert sum(job.attempts for job in after.values()) == len(after) + 1


class _Process:
    def __init__(self, process: subprocess.Popen, stub: OrchestratorStub):
        self.process, self.stub = process, stub

    def __getattr__(self, name: str):
        return getattr(self.stub, name)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


class _orchestrator_process:  # noqa: N801 - used as a context manager
    """services/orchestrator/main.py as a real process (workers in-process), with a stub to it."""

    def __init__(self, env: dict[str, str], port: int, log: Path):
        self.env, self.port, self.log = env, port, log

    def __enter__(self) -> _Process:
        self.log_file = open(self.log, "w")  # noqa: SIM115 - closed in __exit__
        process = subprocess.Popen([sys.executable, str(REPO / "services" / "orchestrator" / "main.py")], env=self.env,
                                   stdout=self.log_file, stderr=subprocess.STDOUT)
        target = f"127.0.0.1:{self.port}"
        wait_for(lambda: process.poll() is not None or _serving(target), "the orchestrator to serve", timeout=180)
        assert process.poll() is None, self.log.read_text()
        self.channel = make_channel(target)
        self.running = _Process(process, OrchestratorStub(self.channel))
        return self.running

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        if self.running.process.poll() is None:
            self.running.process.send_signal(signal.SIGTERM)
            assert self.running.process.wait(timeout=60) == 0, self.log.read_text()
        self.log_file.close()


def _serving(target: str) -> bool:
    try:
        return check_health(target, ORCHESTRATOR, timeout=1) == "SERVING"
    except Unavailable:  # not up yet
        return False


def _count(jobs: list[JobRow], state: str) -> int:
    return sum(job.state == state for job in jobs)
