"""One export job: resolve a model, write it as GGUF, publish the file as an artifact
(kind "gguf") with its provenance. The CLI and the pruner service both call `run_export`."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import prunelab
from prunelab.errors import InvalidArgument
from prunelab.export.gguf_file import GgufFile, check_outtype, write_gguf
from prunelab.models import read_provenance, resolve_model
from prunelab.prune.pruner import Progress, no_progress
from prunelab.store import ArtifactRef, open_store

ARTIFACT_KIND = "gguf"
GGUF_NAME = "model.gguf"  # the one model file of a gguf artifact
PROVENANCE_NAME = "prunelab.json"

@dataclass
class ExportOutcome:
    file: GgufFile
    artifact: ArtifactRef
    source: str  # the model spec exported
    source_sha256: str
    wall_seconds: float

    def as_dict(self) -> dict:
        return {
            "artifact": self.artifact.uri, "source": self.source, "source_sha256": self.source_sha256,
            "architecture": self.file.architecture, "outtype": self.file.outtype, "tensors": self.file.tensors,
            "padded_channels": self.file.padded_channels, "size_bytes": self.file.size_bytes, "wall_seconds": self.wall_seconds,
        }


def run_export(model: str, outtype: str = "f16", *, out_file: Path | None = None, progress: Progress = no_progress) -> ExportOutcome:
    """Export `model` (any spec load_model takes) to GGUF and publish it; with `out_file`
    the .gguf is also copied there. Bad input fails before anything is written."""
    check_outtype(outtype)
    if out_file is not None and Path(out_file).exists():
        raise InvalidArgument(f"{out_file} already exists; exports are never overwritten", field="out")
    started = time.perf_counter()
    store = open_store()  # an unreachable store fails the job before any work
    progress("load", 0.0, f"resolving {model}")
    source = resolve_model(model)
    staging = Path(tempfile.mkdtemp(prefix="prunelab-export-"))
    try:
        progress("write", 0.1, f"writing {outtype} GGUF")
        written = write_gguf(source.path, staging / GGUF_NAME, outtype, name=source.base_id)
        provenance = _provenance(model, source, written)
        (staging / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        progress("save", 0.9, f"publishing {written.size_bytes / 2**20:.0f} MiB")
        meta = {key: provenance[key] for key in ("source_spec", "base_model_id", "architecture", "outtype", "size_bytes")}
        artifact = store.put_dir(staging, kind=ARTIFACT_KIND, meta=meta)
        if out_file is not None:
            shutil.copyfile(staging / GGUF_NAME, out_file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress("done", 1.0, f"{written.architecture} {outtype}, {written.size_bytes / 2**20:.0f} MiB -> {artifact.uri}")
    return ExportOutcome(written, artifact, model, source.sha256, round(time.perf_counter() - started, 3))


def _provenance(spec: str, source, written: GgufFile) -> dict:
    checkpoint = read_provenance(source.path)
    return {
        "source_spec": spec,
        "source_sha256": source.sha256,
        "base_model_id": source.base_id,
        "source_method": checkpoint.get("method", ""),
        "architecture": written.architecture,
        "outtype": written.outtype,
        "tensors": written.tensors,
        "padded_channels": written.padded_channels,
        "size_bytes": written.size_bytes,
        "library_versions": {"gguf": importlib.metadata.version("gguf"), "prunelab": prunelab.__version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
