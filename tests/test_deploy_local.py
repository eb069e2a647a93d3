"""deploy/local/cluster.py: the service topology as local processes (`make up-local`).

Fast tests here: the one-target-for-all-replicas address the orchestrator gets, and
how `down` stops processes. The whole cluster going up, serving studies through faults
(processes killed and restarted) and going down is tests/test_fault_matrix.py; data in
and out over mutual TLS is tests/test_deployment_io.py (both marked `cluster`).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prunelab.errors import FailedPrecondition
from prunelab.rpc import make_channel, serve

CLUSTER_PY = Path(__file__).resolve().parent.parent / "deploy" / "local" / "cluster.py"


def load_cluster_module():
    """deploy/local/cluster.py as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("prunelab_local_cluster", CLUSTER_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cluster = load_cluster_module()


def test_one_ipv4_target_round_robins_over_every_replica():
    """The orchestrator's evaluator address on the local cluster reaches each replica
    (gRPC's ipv4 resolver takes a list; make_channel balances round robin)."""
    servers = [serve([], service_names=[f"prunelab.test.Replica{i}"], port=0) for i in range(2)]
    try:
        target = cluster.ipv4_target([server.port for server in servers])
        assert target == f"ipv4:127.0.0.1:{servers[0].port},127.0.0.1:{servers[1].port}"
        # only the first replica knows "prunelab.test.Replica0"; the other answers NOT_FOUND
        answers = set()
        with make_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(50):  # round robin starts as each replica's connection is up
                if len(answers) == 2:
                    break
                try:
                    health.Check(health_pb2.HealthCheckRequest(service="prunelab.test.Replica0"), timeout=5)
                    answers.add("first")
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND
                    answers.add("second")
        assert answers == {"first", "second"}
    finally:
        for server in servers:
            server.stop(None)


def spawn(code: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.3)  # let it install its signal disposition
    return process


def record(name: str, process: subprocess.Popen, *, port: int | None = 1) -> cluster.Process:
    return cluster.Process(name, process.pid, psutil.Process(process.pid).create_time(), log="-", port=port)


def test_down_stops_by_pid_with_sigterm_then_sigkill(tmp_path, capsys):
    polite = spawn("import time; time.sleep(60)")
    stubborn = spawn("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)")
    # a PID whose recorded start time is not its own: a reused PID, someone else's process
    bystander = spawn("import time; time.sleep(60)")
    stranger = record("stranger", bystander)
    stranger.started -= 1000
    try:
        cluster.Cluster(
            state_dir=str(tmp_path), orchestrator="-", targets={}, store_env={},
            processes=[record("polite", polite), record("stubborn", stubborn), stranger],
        ).save()
        assert sorted(cluster.down(tmp_path, timeout=1.0)) == ["polite", "stubborn"]
        # (down reaps them itself, so their exit codes are not there to read)
        assert not psutil.pid_exists(polite.pid) and not psutil.pid_exists(stubborn.pid)
        killed = capsys.readouterr().out
        assert f"pid {stubborn.pid} ignored SIGTERM" in killed and f"pid {polite.pid} " not in killed
        assert bystander.poll() is None, "down must not signal a process it did not start"
        assert not cluster.state_path(tmp_path).exists()
        assert cluster.down(tmp_path) == []  # nothing recorded: nothing to do
    finally:
        for process in (polite, stubborn, bystander):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_up_refuses_while_a_cluster_is_running(tmp_path):
    running = spawn("import time; time.sleep(60)")
    try:
        cluster.Cluster(state_dir=str(tmp_path), orchestrator="-", targets={}, store_env={},
                        processes=[record("pruner", running)]).save()
        with pytest.raises(FailedPrecondition, match="already running"):
            cluster.up(tmp_path)
        assert running.poll() is None
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
