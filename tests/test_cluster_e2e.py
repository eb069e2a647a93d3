"""The local cluster end to end (`pytest -m cluster`): the services as separate
processes on an S3 store (deploy/local/cluster.py), a study submitted with
`prunelab run --orchestrator`, one of the two evaluator replicas SIGKILLed while
it has work; the study still completes, with the numbers the embedded run gives."""

from __future__ import annotations

import csv
import io
import math
import signal

import psutil
import pytest
from test_deploy_local import cluster as local_cluster
from test_orchestrate import ppl_only, tiny_study_text, wait_for, write_text

from prunelab.cli import main as cli_main
from prunelab.config import settings
from prunelab.orchestrate import load_study
from prunelab.rpc import make_channel
from prunelab.v1 import orchestrator_pb2
from prunelab.v1.orchestrator_pb2_grpc import OrchestratorStub

pytestmark = pytest.mark.cluster


def test_a_study_on_the_local_cluster_survives_a_killed_evaluator_and_matches_the_embedded_run(tiny_checkpoint, tmp_path, capsys):
    text = write_text(tmp_path / "text")
    evaluation = {**ppl_only(text, seq_lens=[2, 3, 4, 5], max_windows=800), "batch_size": 1}  # seconds per job
    path = tmp_path / "cluster.yaml"
    path.write_text(tiny_study_text(tiny_checkpoint, text, tuning=None, profiling=None, evaluation=evaluation))
    study_id = load_study(path).id

    running = local_cluster.up(tmp_path / "cluster", orchestrator_port=0)
    try:
        states = local_cluster.status(tmp_path / "cluster")
        assert states.pop("seaweedfs") == "running" and set(states.values()) == {"SERVING"}
        assert sorted(states) == ["evaluator-1", "evaluator-2", "orchestrator", "profiler", "pruner", "tuner"]
        assert cli_main(["run", str(path), "--orchestrator", running.orchestrator, "--detach"]) == 0
        with make_channel(running.orchestrator) as channel:
            stub = OrchestratorStub(channel)
            get = lambda: stub.GetStudy(orchestrator_pb2.GetStudyRequest(study_id=study_id))  # noqa: E731
            wait_for(lambda: sum(job.kind == "evaluate" and job.state == "running" for job in get().jobs) >= 2,
                     "both evaluators to have work", timeout=600)
            victim = next(p for p in running.processes if p.name == "evaluator-1")
            psutil.Process(victim.pid).send_signal(signal.SIGKILL)
            assert cli_main(["watch", study_id, "--orchestrator", running.orchestrator]) == 0
            study = get()
            report = stub.GetReport(orchestrator_pb2.GetReportRequest(study_id=study_id))
    finally:
        stopped = local_cluster.down(tmp_path / "cluster")
    # down stops every process but the one SIGKILLed above, and leaves none running
    assert sorted(stopped) == sorted(p.name for p in running.processes if p.name != "evaluator-1")
    assert not any(process.handle() for process in running.processes)
    capsys.readouterr()
    assert study.state == "done" and study.counts.done == study.counts.total == 14
    assert any(job.attempts > 1 for job in study.jobs if job.kind == "evaluate"), "no job was cut off by the kill"

    # the same study embedded, in this process and its local store
    assert cli_main(["run", str(path)]) == 0
    embedded = _perplexities((settings().home / "reports" / study_id / "measurements.csv").read_text())
    distributed = _perplexities(next(f.content.decode() for f in report.files if f.name == "measurements.csv"))
    assert distributed.keys() == embedded.keys() and len(embedded) == 12
    for key, value in embedded.items():
        assert math.isclose(distributed[key], value, rel_tol=1e-4), key


def _perplexities(measurements_csv: str) -> dict[tuple[str, str], float]:
    return {(row["model"], row["seq_len"]): float(row["value"]) for row in csv.DictReader(io.StringIO(measurements_csv))}
