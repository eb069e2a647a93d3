"""One pruning job end to end: load, prune, save the checkpoint, publish it to the
store. The CLI and the pruner service both call `run_prune`."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prunelab.data import resolve_text
from prunelab.errors import InvalidArgument
from prunelab.models import load_model, save_checkpoint
from prunelab.prune.memory import PeakMemory
from prunelab.prune.pruner import Progress, PruneReport, PruneSettings, no_progress, prune_model
from prunelab.prune.sparse import check_saved_sparsity
from prunelab.store import ArtifactRef, ArtifactStore, open_store

log = logging.getLogger(__name__)

STRUCTURE_KEY = "pruning"  # prunelab.json key holding the kept indices per layer
SPARSITY_KEY = "sparsity"  # prunelab.json key of a sparse model's pattern and per-layer sparsity


@dataclass
class PruneOutcome:
    report: PruneReport
    artifact: ArtifactRef
    checkpoint_dir: Path | None  # the plain directory written when out_dir was given
    peak_memory_bytes: int
    memory_kind: str  # "rss" on CPU, "cuda_max_allocated" on GPU
    wall_seconds: float
    base_model: str
    base_sha256: str

    def as_dict(self) -> dict:
        return {
            **self.report.as_dict(),
            "artifact": self.artifact.uri,
            "checkpoint_dir": str(self.checkpoint_dir) if self.checkpoint_dir else None,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_kind": self.memory_kind,
            "wall_seconds": self.wall_seconds,
            "base_model": self.base_model,
            "base_sha256": self.base_sha256,
        }


def run_prune(
    model: str,
    settings: PruneSettings,
    *,
    device: str = "cpu",
    calibration_split: str = "train",
    out_dir: Path | None = None,
    progress: Progress = no_progress,
) -> PruneOutcome:
    """Prune `model` as `settings` say and publish the result. Bad input fails before
    anything is written; a failure mid-way leaves no artifact and no `out_dir`."""
    settings.validate()
    if out_dir is not None and Path(out_dir).exists():
        raise InvalidArgument(f"{out_dir} already exists; checkpoints are never overwritten", field="out_dir")
    started = time.perf_counter()
    on_gpu = torch.device(device).type == "cuda"
    # Opened first: an unreachable store fails the job before any work, and an outage
    # during it costs the upload's retries (PRUNELAB_S3_RETRY_S), not the pruning.
    store = open_store()
    with PeakMemory(device) as memory:
        progress("load", 0.0, f"loading {model}")
        # bf16 on GPUs halves memory and is what the importance pass is run in there;
        # CPUs lack fast bf16 matmuls, so fp32.
        loaded = load_model(model, dtype=torch.bfloat16 if on_gpu else torch.float32, device=device)
        text = resolve_text(settings.calibration, split=calibration_split) if settings.needs_calibration_text else ""
        report = prune_model(loaded.model, loaded.tokenizer, settings, text, progress)
        progress("save", 0.9, "writing the checkpoint")
        artifact, checkpoint_dir = _publish(loaded, settings, report, calibration_split, out_dir, store)
    outcome = PruneOutcome(
        report=report,
        artifact=artifact,
        checkpoint_dir=checkpoint_dir,
        peak_memory_bytes=memory.peak_bytes,
        memory_kind=memory.kind,
        wall_seconds=round(time.perf_counter() - started, 3),
        base_model=loaded.source.base_id,
        base_sha256=loaded.source.sha256,
    )
    progress("done", 1.0, f"removed {report.ratio_got:.2%} of parameters -> {artifact.uri}")
    return outcome


def _publish(loaded, settings: PruneSettings, report: PruneReport, calibration_split: str,
             out_dir: Path | None, store: ArtifactStore) -> tuple[ArtifactRef, Path | None]:
    provenance = {
        "base_model_id": loaded.source.base_id,
        "base_model_sha256": loaded.source.sha256,
        "base_model_spec": loaded.source.spec,
        "method": settings.label,
        "settings": {**asdict(settings), "calibration_split": calibration_split},
        "seed": settings.seed,
        "ratio_asked": report.ratio_asked,
        "ratio_got": report.ratio_got,
        "semantics": report.semantics,
        "params_before": report.params_before,
        "nonzero_params": report.nonzero_params,
        STRUCTURE_KEY: report.kept,
    }
    if report.sparsity is not None:
        provenance[SPARSITY_KEY] = report.sparsity
    staging_root = None
    if out_dir is None:
        staging_root = Path(tempfile.mkdtemp(prefix="prunelab-prune-"))
        target = staging_root / "checkpoint"
    else:
        target = Path(out_dir)
    try:
        save_checkpoint(loaded.model, loaded.tokenizer, target, provenance)
        if report.sparsity is not None:
            check_saved_sparsity(target, report.sparsity)
        meta = {
            "base_model": loaded.source.base_id,
            "method": settings.label,
            "variant": settings.variant if settings.method == "taylor" else "",
            "ratio_asked": report.ratio_asked,
            "ratio_got": round(report.ratio_got, 6),
            "semantics": report.semantics,
            "params_after": report.params_after,
            "nonzero_params": report.nonzero_params,
            "pattern": report.sparsity["pattern"] if report.sparsity else "",
        }
        artifact = store.put_dir(target, kind="model", meta=meta)
    except BaseException:
        if out_dir is not None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        if staging_root is not None:
            shutil.rmtree(staging_root, ignore_errors=True)
    return artifact, (None if out_dir is None else target)
