"""Named datasets in the artifact store, and resolving a name to text or records.

A dataset is one artifact of kind `dataset` holding one file per split, stored as
`<split><ext>` (validation.txt, train.jsonl, ...), plus the ref `datasets/<name>`
whose meta describes it, so listing needs no downloads. Importing one split into an
existing dataset of the same format keeps its other splits (a new artifact; the ref
moves, old artifacts stay); importing a folder, or another format, replaces it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prunelab.config import settings
from prunelab.data.corpora import BUILTIN_CORPORA, FALLBACK_SOURCE, HubSource, fallback_text
from prunelab.data.formats import (
    canonical_split,
    count_words,
    detect_format,
    get_format,
    read_records,
    split_files,
    split_of_file,
)
from prunelab.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from prunelab.store import ArtifactStore, open_store, parse_artifact_uri
from prunelab.store.base import check_ref_name
from prunelab.store.manifest import sha256_file

log = logging.getLogger(__name__)

REF_PREFIX = "datasets/"
DATA_DIR_ENV = "PRUNELAB_DATA_DIR"  # folder of <name>/<split files>, e.g. ../shared/data


@dataclass(frozen=True)
class SplitInfo:
    file: str  # file name inside the artifact
    sha256: str
    size: int  # bytes
    rows: int  # non-empty lines (text) or records (jsonl, alpaca)
    words: int


@dataclass(frozen=True)
class DatasetRef:
    name: str
    uri: str  # artifact://<digest>
    format: str  # text | jsonl | alpaca
    splits: dict[str, SplitInfo]

    @property
    def size(self) -> int:
        return sum(info.size for info in self.splits.values())

    @property
    def digest(self) -> str:
        return parse_artifact_uri(self.uri)


def import_dataset(
    name: str,
    path: Path | str,
    split: str | None = None,
    kind: str | None = None,
    store: ArtifactStore | None = None,
) -> DatasetRef:
    """Store file or folder `path` as dataset `name` and point `datasets/<name>` at it.

    `kind` is the format (text, jsonl or alpaca; detected from the file if None).
    `split` names the split a single file holds (else its file name must say, as in
    valid.tokens); with a folder it picks that one split out of it.
    """
    store = store or open_store()
    ref_name = _ref_name(name)
    sources = _split_sources(Path(path), split)
    fmt = get_format(kind or detect_format(next(iter(sources.values()))))
    with tempfile.TemporaryDirectory(prefix="prunelab-dataset-") as staging_dir:
        staging = Path(staging_dir)
        splits = {s: _stage_split(fmt.name, s, src, staging) for s, src in sources.items()}
        if split is not None:
            splits = _keep_other_splits(name, fmt.name, splits, staging, store) | splits
        meta = {"format": fmt.name, "splits": {s: asdict(info) for s, info in sorted(splits.items())}}
        artifact = store.put_dir(staging, "dataset", meta)
    store.set_ref(ref_name, artifact.uri, meta)
    log.info("dataset %s -> %s (%s; splits %s)", name, artifact.uri, fmt.name, ", ".join(sorted(splits)))
    return _dataset_ref(name, artifact.uri, meta)


def get_dataset(name: str, store: ArtifactStore | None = None) -> DatasetRef:
    """The stored dataset `name`; NotFound if it was never imported."""
    ref = (store or open_store()).get_ref(_ref_name(name))
    return _dataset_ref(name, ref.uri, ref.meta)


def list_datasets(store: ArtifactStore | None = None) -> list[DatasetRef]:
    refs = (store or open_store()).list_refs(REF_PREFIX)
    return [_dataset_ref(ref.name.removeprefix(REF_PREFIX), ref.uri, ref.meta) for ref in refs]


def resolve_text(name_or_path: str, split: str = "validation", store: ArtifactStore | None = None) -> str:
    """The text of `split` of a text dataset, from (first that has it): the store, a
    local file or folder, `$PRUNELAB_DATA_DIR/<name>/` for the built-in corpora, the
    hub (only when online), and for built-ins the embedded fallback corpus."""
    split = canonical_split(split)
    stored = _stored_split_file(name_or_path, split, store, want="text")
    if stored is not None:
        return stored.read_text(encoding="utf-8")
    local = _local_split_file(Path(name_or_path), split)
    if local is not None:
        return local.read_text(encoding="utf-8")
    corpus = BUILTIN_CORPORA.get(name_or_path)
    if corpus is not None:
        return _builtin_text(name_or_path, corpus.hub, split)
    if settings().offline:
        raise _not_available_offline(name_or_path, split)
    rows = _hub_rows(name_or_path, None, split)
    if rows and "text" not in rows[0]:
        raise InvalidArgument(f"hub dataset {name_or_path!r} has no 'text' field (it has {sorted(rows[0])})", field="name")
    return "\n".join(str(row["text"]) for row in rows)


def load_records(name: str, split: str, store: ArtifactStore | None = None) -> list[dict[str, Any]]:
    """The records of `split` of a jsonl or alpaca dataset: from the store, a local
    file or folder, or (only when online) the hub."""
    split = canonical_split(split)
    stored = _stored_split_file(name, split, store, want="records")
    if stored is not None:
        return read_records(stored)
    local = _local_split_file(Path(name), split)
    if local is not None:
        return read_records(local)
    if settings().offline:
        raise _not_available_offline(name, split)
    return _hub_rows(name, None, split)


# ---- importing ----


def _ref_name(name: str) -> str:
    try:
        return check_ref_name(REF_PREFIX + name)
    except InvalidArgument:
        raise InvalidArgument(
            f"dataset name {name!r} must be letters, digits, '.', '_' or '-' (optionally owner/name)", field="name"
        ) from None


def _split_sources(path: Path, split: str | None) -> dict[str, Path]:
    """Canonical split -> source file for what is being imported."""
    if path.is_file():
        chosen = canonical_split(split) if split is not None else split_of_file(path)
        if chosen is None:
            raise InvalidArgument(f"cannot tell which split {path.name} holds; pass --split", field="split")
        return {chosen: path}
    if not path.is_dir():
        raise InvalidArgument(f"{path} does not exist", field="path")
    found = split_files(path)
    if split is not None:
        wanted = canonical_split(split)
        if wanted not in found:
            raise InvalidArgument(f"{path} has no file for split {wanted!r} (found: {sorted(found) or 'none'})", field="split")
        return {wanted: found[wanted]}
    if not found:
        raise InvalidArgument(
            f"{path} has no split files (name them train/validation/test, e.g. validation.jsonl or valid.txt)",
            field="path",
        )
    return found


def _stage_split(fmt: str, split: str, source: Path, staging: Path) -> SplitInfo:
    """Validate `source` as `fmt` and write it to `staging/<split><ext>`: byte for
    byte, except JSON arrays of records, which become JSONL."""
    data_format = get_format(fmt)
    rows = data_format.read_rows(source)
    if not rows:
        raise InvalidArgument(f"{source} holds no {fmt} rows", field="path")
    target = staging / f"{split}{data_format.extension}"
    if fmt != "text" and source.suffix == ".json":
        target.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    else:
        shutil.copyfile(source, target)
    return SplitInfo(target.name, sha256_file(target), target.stat().st_size, len(rows), count_words(rows))


def _keep_other_splits(
    name: str, fmt: str, new: dict[str, SplitInfo], staging: Path, store: ArtifactStore
) -> dict[str, SplitInfo]:
    """The splits of the stored dataset `name` that the import does not replace,
    copied into `staging` (none if there is no such dataset or its format differs)."""
    try:
        current = get_dataset(name, store)
    except NotFound:
        return {}
    if current.format != fmt:
        log.warning("dataset %s was %s, now %s: its other splits are dropped", name, current.format, fmt)
        return {}
    kept = {s: info for s, info in current.splits.items() if s not in new}
    if kept:
        files = store.get_dir(current.uri)
        for info in kept.values():
            shutil.copyfile(files / info.file, staging / info.file)
    return kept


def _dataset_ref(name: str, uri: str, meta: dict[str, Any]) -> DatasetRef:
    splits = {s: SplitInfo(**info) for s, info in meta.get("splits", {}).items()}
    return DatasetRef(name, uri, meta.get("format", "text"), splits)


# ---- resolving ----


def _stored_split_file(name: str, split: str, store: ArtifactStore | None, want: str) -> Path | None:
    """The stored file for `split` of dataset `name`, or None if no such dataset."""
    store = store or open_store()
    try:
        dataset = get_dataset(name, store)
    except (NotFound, InvalidArgument):  # not imported, or not even a dataset name (a path)
        return None
    if (want == "text") != (dataset.format == "text"):
        use = "load_records" if want == "text" else "resolve_text"
        raise InvalidArgument(f"dataset {name!r} is {dataset.format}; read it with {use}", field="name")
    if split not in dataset.splits:
        raise FailedPrecondition(
            f"dataset {name!r} has no {split!r} split (it has {', '.join(sorted(dataset.splits))}); "
            f"add it with: prunelab data import {name} PATH --split {split}",
            field="split",
        )
    return store.get_dir(dataset.uri) / dataset.splits[split].file


def _local_split_file(path: Path, split: str) -> Path | None:
    if path.is_file():
        return path
    if path.is_dir():
        return split_files(path).get(split)
    return None


def _builtin_text(name: str, hub: HubSource, split: str) -> str:
    data_dir = settings().data_dir
    if data_dir:
        local = _local_split_file(data_dir / name, split)
        if local is not None:
            return local.read_text(encoding="utf-8")
    reason = "offline"
    if not settings().offline:
        try:
            return hub.joiner.join(str(row[hub.text_field]) for row in _hub_rows(hub.path, hub.config, split))
        except Unavailable as err:
            reason = err.reason
    log.warning(
        "%s (%s): no stored copy, none in $%s, hub not used (%s). Using the embedded fallback corpus, "
        "%s, which is NOT %s: its perplexities are not comparable to published ones. "
        "To use the real corpus: prunelab data import %s PATH --split %s",
        name, split, DATA_DIR_ENV, reason, FALLBACK_SOURCE, name, name, split,
    )
    return fallback_text(split)


def _hub_rows(path: str, config: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return [dict(row) for row in datasets.load_dataset(path, config, split=split)]
    except Exception as err:  # noqa: BLE001 - the hub client raises many types; all mean "not from the hub"
        raise Unavailable(f"cannot load {path!r} split {split!r} from the hub: {type(err).__name__}: {err}") from None


def _not_available_offline(name: str, split: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"dataset {name!r} is not in the store or on disk and PRUNELAB_OFFLINE is set; "
        f"import it with: prunelab data import {name} PATH --split {split}",
        field="name",
    )
