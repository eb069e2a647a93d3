"""Data in, models and reports out, on the local cluster (`pytest -m cluster`): the
services as separate processes on a SeaweedFS S3 store (deploy/local/cluster.py).
A dataset goes in through the orchestrator (`prunelab data import --orchestrator`)
and the workers calibrate and measure on it; the stub-only Python client
(examples/client.py, which must not import torch) submits the study, follows it and
downloads the report; a pruned checkpoint and the report come out with `prunelab
artifact get`, through the orchestrator and straight from S3, byte for byte what
the store holds; the orchestrator's /metrics counts the jobs. The cluster speaks
mutual TLS (`up(tls=True)`): every call here shows the cluster's client certificate,
and a caller without one is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_deploy_local import cluster as local_cluster
from test_metrics import scrape
from test_orchestrate import ppl_only, tiny_study_text, write_text

from prunelab.cli import main
from prunelab.config import settings
from prunelab.data import get_dataset
from prunelab.orchestrate import load_study
from prunelab.store import open_store

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "examples" / "client.py"
# Runs the example as `python examples/client.py ...` would, then checks that torch
# never came into the process.
RUN_CLIENT_WITHOUT_TORCH = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
assert "torch" not in sys.modules, "the client example imported torch"
sys.exit(code)
"""


@pytest.fixture(scope="module")
def running_cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster")
    running = local_cluster.up(state_dir, orchestrator_port=0, tls=True)
    yield running
    local_cluster.down(state_dir)


@pytest.fixture
def deployment_store(running_cluster, monkeypatch):
    """This process's configured store and certificate are the cluster's (as a user with its keys would have them)."""
    for key, value in (running_cluster.store_env | running_cluster.client_env).items():
        monkeypatch.setenv(key, value)
    settings.cache_clear()
    return open_store()


def test_data_in_study_through_the_python_client_and_checkpoints_and_report_out(
    running_cluster, deployment_store, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    target = running_cluster.orchestrator
    # no certificate, no call
    monkeypatch.delenv("PRUNELAB_TLS_DIR")
    settings.cache_clear()
    assert main(["status", "--orchestrator", target]) == 1
    assert "prunelab status: error: connections to all backends failing" in capsys.readouterr().err
    monkeypatch.setenv("PRUNELAB_TLS_DIR", running_cluster.client_env["PRUNELAB_TLS_DIR"])
    settings.cache_clear()
    # data in, through the orchestrator only; then it is in the deployment's store
    assert main(["data", "import", "cluster-text", str(write_text(tmp_path / "text")), "--orchestrator", target]) == 0
    dataset = get_dataset("cluster-text", store=deployment_store)
    assert dataset.uri in capsys.readouterr().out and sorted(dataset.splits) == ["train", "validation"]
    assert main(["artifact", "list", "--kind", "dataset", "--orchestrator", target]) == 0
    assert dataset.uri in capsys.readouterr().out

    # a study that calibrates and measures on the imported dataset, through the example client
    study = tmp_path / "io.yaml"
    study.write_text(tiny_study_text(tiny_checkpoint, Path("unused"), tuning=None, profiling=None,
                                     calibration={"dataset": "cluster-text", "samples": 2, "seq_len": 8},
                                     evaluation=ppl_only(Path("cluster-text"))))
    client = subprocess.run(
        [sys.executable, "-c", RUN_CLIENT_WITHOUT_TORCH, str(CLIENT), str(study), "--orchestrator", target,
         "--tls-dir", running_cluster.client_env["PRUNELAB_TLS_DIR"], "--out", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=600,
    )
    assert client.returncode == 0, client.stdout + client.stderr
    study_id = load_study(study).id
    assert f"submitted {study_id}" in client.stdout and f"{study_id}: done" in client.stdout and "files verified" in client.stdout
    report_md = (tmp_path / "report" / "report.md").read_text()
    assert "cluster-text" in report_md

    # the report and the pruned checkpoints out, through the orchestrator and straight from S3
    [report] = [ref for ref in deployment_store.list("report") if (deployment_store.get_dir(ref.uri) / "report.md").read_text() == report_md]
    models = deployment_store.list("model")
    assert len(models) == 2  # taylor and l2 at 20 %
    monkeypatch.delenv("PRUNELAB_STORE")  # from here the configured store is a local, empty one
    settings.cache_clear()
    for ref in [report, *models]:
        stored = _files(deployment_store.get_dir(ref.uri))
        for where in (["--orchestrator", target], ["--store", running_cluster.store_env["PRUNELAB_STORE"]]):
            out = tmp_path / "out" / ref.digest[:12] / where[0].strip("-")
            assert main(["artifact", "get", ref.uri, "--out", str(out), *where]) == 0
            assert _files(out) == stored, (ref.kind, where[0])
    assert any(name.endswith(".safetensors") for name in _files(tmp_path / "out" / models[0].digest[:12] / "orchestrator"))

    # the orchestrator's metrics counted the jobs it ran
    samples = scrape(running_cluster.metrics)
    assert samples[("prunelab_job_duration_seconds_count", "prune")] == 2
    assert samples[("prunelab_job_duration_seconds_count", "evaluate")] == 3  # base and two pruned models
    assert samples[("prunelab_jobs_queued", "evaluate")] == samples[("prunelab_jobs_running", "evaluate")] == 0
    assert samples[("prunelab_job_failures_total", "evaluate")] == 0


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}

