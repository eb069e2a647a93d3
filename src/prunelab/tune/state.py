"""Resumable tuning: the state of a training run and where it is kept between runs.

A job's snapshots live in `settings().home / "jobs" / "tune-<key>"`, where the key
hashes everything that decides the result (input weights, data read, settings,
precision), so re-running the same job finds its state and a different job never
does. They are kept on the local disk rather than in the object store: the store is
immutable and has no delete, so a snapshot every K steps would pile up forever
there; a service that must resume on another host mounts PRUNELAB_HOME on a shared
volume instead.

A snapshot is a directory of safetensors files (trained weights: LoRA's or the
whole model's; the best ones so far; optimizer moments; RNG states) plus `state.json` (step, curve, best so far, stop
reason, optimizer hyperparameters), written beside the others and renamed into
place, so a crash mid-write leaves the previous snapshot as the latest. Nothing is
pickled, read or written.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prunelab.config import settings
from prunelab.errors import FailedPrecondition

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOCK_FILE = "lock"
SNAPSHOT_FORMAT = 2  # 2: trained/best tensors (any trained parameters), tokens_seen
_SNAPSHOT_NAME = re.compile(r"snapshot-(\d{6})")


@dataclass
class CurvePoint:
    step: int
    train_loss: float | None  # mean over the steps since the previous evaluation; None at step 0
    val_loss: float | None  # mean NLL per scored validation token; None when not finite
    val_ppl: float | None


@dataclass
class TrainingState:
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # labelled training tokens of those steps: runs compare at equal tokens
    curve: list[CurvePoint] = field(default_factory=list)
    best_step: int = 0
    best_val_loss: float | None = None  # None until step 0 is evaluated
    evaluations_since_best: int = 0
    stop: str = ""  # "" while training; then completed | early_stop | non_finite
    stop_detail: str = ""  # for non_finite: what was not finite, and at which step

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TrainingState:
        return cls(**{**record, "curve": [CurvePoint(**point) for point in record["curve"]]})


def job_directory(key: str) -> JobDirectory:
    return JobDirectory(settings().home / "jobs" / f"tune-{key}")


class JobDirectory:
    """The snapshots of one tuning job; only the newest is kept."""

    def __init__(self, path: Path):
        self.path = path

    @contextmanager
    def locked(self) -> Iterator[JobDirectory]:
        """Hold the job for this process: a second run of the same job at the same
        time would overwrite this one's snapshots."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FailedPrecondition(
                    f"the same tuning job (same model, data and settings) is already running ({self.path})", field="model"
                ) from None
            yield self

    def save(self, record: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> Path:
        """Write a new snapshot: one `<name>.safetensors` per entry of `tensors`, then
        `record` as state.json; then drop the older snapshots."""
        newest = self._snapshots()
        number = int(_SNAPSHOT_NAME.fullmatch(newest[-1].name).group(1)) + 1 if newest else 0
        staging = self.path / f".staging-{secrets.token_hex(6)}"
        staging.mkdir()
        try:
            for name, group in tensors.items():
                save_file({key: value.detach().contiguous().cpu() for key, value in group.items()}, str(staging / f"{name}.safetensors"))
            (staging / STATE_FILE).write_text(json.dumps({"format": SNAPSHOT_FORMAT, **record}, allow_nan=False, indent=1))
            target = self.path / f"snapshot-{number:06d}"
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in newest:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def load_latest(self) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]] | None:
        """The newest snapshot's record and tensors, or None when there is none."""
        snapshots = self._snapshots()
        if not snapshots:
            return None
        latest = snapshots[-1]
        record = json.loads((latest / STATE_FILE).read_text())
        if record.get("format") != SNAPSHOT_FORMAT:
            raise FailedPrecondition(f"{latest} has snapshot format {record.get('format')}, expected {SNAPSHOT_FORMAT}")
        tensors = {path.stem: load_file(str(path)) for path in latest.glob("*.safetensors")}
        log.info("resuming from %s (step %s)", latest, record.get("state", {}).get("step"))
        return record, tensors

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _snapshots(self) -> list[Path]:
        """Complete snapshots, oldest first (staging directories are not named so)."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if _SNAPSHOT_NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)
