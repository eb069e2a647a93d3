"""One tuning job over several processes for the tuner service: the service writes
the job (model, settings, device) to a JSON file and starts

    python -m torch.distributed.run --standalone --nproc-per-node N -m prunelab.tune.spawn JOB.json

Every rank runs `run_tune` (data-parallel, ranks.py); rank 0 writes one JSON object
per line on stdout: {"update": ...} for each progress update, then {"result": ...}
(the outcome) or {"error": {"code", "reason", "field"}} (code: the error's gRPC status name). `SpawnedJob` is the service's
side: it starts the processes, turns the lines back into updates and the outcome,
and stops the processes when the call ends first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prunelab.access import child_environment
from prunelab.errors import FailedPrecondition, PrunelabError, error_class
from prunelab.tune.job import TuneOutcome, TuneUpdate, run_tune
from prunelab.tune.ranks import device_of_rank, process_group
from prunelab.tune.settings import TuneSettings
from prunelab.tune.trainer import TrainingProgress

STOP_GRACE_S = 10  # after SIGTERM, before SIGKILL


class SpawnedJob:
    """Runs `run_tune(model, settings)` in `processes` torchrun processes on `device`."""

    def __init__(self, model: str, settings: TuneSettings, device: str, processes: int):
        self.model = model
        self.settings = settings
        self.device = device
        self.processes = processes

    def __call__(self, report: Callable[[TuneUpdate], None], _should_stop: Callable[[], bool]) -> TuneOutcome:
        with tempfile.TemporaryDirectory(prefix="prunelab-tune-spawn-") as folder:
            job_file, log_file = Path(folder) / "job.json", Path(folder) / "stderr.log"
            job_file.write_text(json.dumps({"model": self.model, "settings": self.settings.as_dict(), "device": self.device}))
            with open(log_file, "w") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.processes}",
                     "-m", "prunelab.tune.spawn", str(job_file)],
                    stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
                    env=child_environment(),  # the training processes read only what the request may name
                )
                try:
                    outcome = self._follow(process, report)
                finally:
                    _stop(process)
            if outcome is None:
                tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
                raise FailedPrecondition(f"the {self.processes} tuning processes ended without a result: {' | '.join(tail)}")
            return outcome

    @staticmethod
    def _follow(process: subprocess.Popen, report: Callable[[TuneUpdate], None]) -> TuneOutcome | None:
        for line in process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library's stray print
            if "update" in event:
                report(_update(event["update"]))  # raises once the call has ended, which stops the processes
            elif "result" in event:
                return TuneOutcome.from_dict(event["result"])
            elif "error" in event:
                error = event["error"]
                raise error_class(error["code"])(error["reason"], field=error.get("field") or "")
        return None


def _stop(process: subprocess.Popen) -> None:
    """End the whole torchrun process group: politely, then not."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _update(record: dict[str, Any]) -> TuneUpdate:
    training = record.get("training")
    return TuneUpdate(record["phase"], record["fraction"], record["message"], TrainingProgress(**training) if training else None)


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event, default=str), flush=True)


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    given = {key: tuple(value) if isinstance(value, list) else value for key, value in job["settings"].items()}
    settings = TuneSettings(**given)
    device = device_of_rank(job["device"])
    with process_group(device) as ranks:
        try:
            outcome = run_tune(job["model"], settings, device=device, progress=lambda update: _emit({"update": asdict(update)}))
        except PrunelabError as error:
            if ranks.main:
                _emit({"error": {"code": error.grpc_code, "reason": error.reason, "field": error.field}})
            return 1
    if outcome is not None:
        _emit({"result": outcome.as_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
