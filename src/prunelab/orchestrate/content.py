"""What a study's names stand for at submit time, so the result cache keys on content.

A job's inputs name models and data ("wikitext2", "my-corpus", "smollm2-135m", a
folder); the orchestrator reuses a finished job whose inputs hash the same. Names are
mutable: a dataset imported again under its name, a folder edited, must not reuse a
result computed on the old content. So each name the jobs use is resolved here to a
fingerprint of what it names now, and the fingerprints are hashed with the inputs:
- a stored dataset (task data too): its artifact URI (a content digest);
- a local file or folder, the data folder's included: the sha256 of its files'
  names, sizes, mtimes and inodes (an edit changes it; cheaper than hashing gigabytes);
- a registered model: the same, of the file it ships;
- an `artifact://` model: nothing to add (it is content already);
- a built-in corpus or hub id with none of the above: nothing; its name is the key.
Done where the orchestrator runs: confined like any work of a service (prunelab.access).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prunelab.access import local_path
from prunelab.config import settings
from prunelab.data import find_task_data, get_dataset
from prunelab.errors import InvalidArgument, NotFound, PermissionDenied
from prunelab.models.registry import registered_model
from prunelab.store.manifest import SCHEME as ARTIFACT_SCHEME
from prunelab.store.verify import folder_signature, stat_key

DATASET_INPUTS = ("calibration", "data", "val_data", "ppl_corpora")
TASK_INPUTS = ("tasks",)
MODEL_INPUTS = ("model", "baseline", "teacher")


def fingerprints(inputs: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Name -> fingerprint for every dataset, task and model name in the jobs' `inputs`
    that resolves to content here (names that do not are left out)."""
    found: dict[str, str] = {}
    for job_inputs in inputs:
        for key, resolve in ((DATASET_INPUTS, _dataset), (TASK_INPUTS, _task), (MODEL_INPUTS, _model)):
            for name in _names(job_inputs, key):
                if name not in found and (digest := resolve(name)):
                    found[name] = digest
    return found


def _names(job_inputs: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    values = [job_inputs.get(key) for key in keys]
    flat = [item for value in values for item in (value if isinstance(value, list) else [value])]
    return [item for item in flat if isinstance(item, str) and item]


def _dataset(name: str) -> str:
    try:
        return get_dataset(name).uri
    except (NotFound, InvalidArgument):  # not stored (or not even a dataset name): a path?
        return _files_signature(_local(name))


def _task(name: str) -> str:
    ref = find_task_data(name)
    return ref.uri if ref is not None else ""


def _model(spec: str) -> str:
    if spec.startswith(ARTIFACT_SCHEME):
        return ""
    entry = registered_model(spec)
    return _files_signature(entry.locate() if entry is not None else _local(spec))


def _local(name: str) -> Path | None:
    """The file or folder `name` is: a path, or a folder of the data folder."""
    try:
        path = local_path(name, field="name")
    except (PermissionDenied, InvalidArgument):  # the job itself will say so
        return None
    data_dir = settings().data_dir
    if path is None and data_dir is not None and not Path(name).is_absolute() and ".." not in Path(name).parts:
        path = data_dir / name
    return path


def _files_signature(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    signature = folder_signature(path) if path.is_dir() else ((path.name, *stat_key(path)),)
    return "files:" + hashlib.sha256(repr(signature).encode()).hexdigest()
