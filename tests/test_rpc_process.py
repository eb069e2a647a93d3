"""prunelab.rpc as separate processes: graceful shutdown of `run_forever` on
SIGTERM/SIGINT, and the `python -m prunelab.rpc.healthcheck` entry point."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures.grpc import PROBE_SERVICE, ProbeClient

from prunelab.rpc import make_channel
from prunelab.rpc.healthcheck import main as healthcheck_main
from prunelab.v1.common_pb2 import Progress

TESTS_DIR = Path(__file__).resolve().parent
STARTUP_TIMEOUT_S = 15


def wait_for_log_line(log_path: Path, pattern: str, process: subprocess.Popen) -> re.Match:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(pattern, log_path.read_text())
        if match:
            return match
        assert process.poll() is None, f"server exited early:\n{log_path.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r} in:\n{log_path.read_text()}")


@pytest.fixture
def probe_process(tmp_path):
    """A `python -m fixtures.grpc` server (Probe under run_forever); yields (process, port, log path)."""
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "fixtures.grpc"],
            cwd=TESTS_DIR,
            stderr=log_file,
            env={**os.environ, "PRUNELAB_LOG_LEVEL": "INFO", "PRUNELAB_LOG_FORMAT": "text"},
        )
    try:
        port = int(wait_for_log_line(log_path, r"serving \S+ on 127\.0\.0\.1:(\d+)", process)[1])
        yield process, port, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prunelab.rpc.healthcheck", *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_call_then_exits_0(probe_process, stop_signal):
    process, port, log_path = probe_process
    target = f"127.0.0.1:{port}"
    with make_channel(target) as channel:
        result: list[Progress] = []
        in_flight = threading.Thread(
            target=lambda: result.append(ProbeClient(channel).sleep(Progress(eta_seconds=1.5), timeout=10))
        )
        in_flight.start()
        wait_for_log_line(log_path, r"sleeping", process)
        signalled_at = time.monotonic()
        process.send_signal(stop_signal)
        wait_for_log_line(log_path, rf"{stop_signal.name}: NOT_SERVING", process)
        assert healthcheck_main([target, "--timeout", "1"]) == 1  # draining: no new calls
        in_flight.join(timeout=10)

    assert result == [Progress(phase="slept")]
    assert process.wait(timeout=5) == 0
    assert time.monotonic() - signalled_at < 5
    assert "stopped" in log_path.read_text()


def test_healthcheck_entry_point_exit_codes(probe_process, capsys):
    _, port, _ = probe_process
    target = f"127.0.0.1:{port}"

    serving = healthcheck(target, PROBE_SERVICE)
    assert (serving.returncode, serving.stdout.strip()) == (0, "SERVING")
    assert healthcheck_main([target]) == 0
    assert healthcheck_main([target, "prunelab.v1.Unknown"]) == 1
    assert capsys.readouterr().out.split() == ["SERVING", "SERVICE_UNKNOWN"]


def test_healthcheck_of_nothing_listening_exits_1():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    unreachable = healthcheck(f"127.0.0.1:{free_port}", "--timeout", "1")
    assert unreachable.returncode == 1
    assert "UNAVAILABLE" in unreachable.stderr or "DEADLINE_EXCEEDED" in unreachable.stderr
