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

from prunelab.access import check_hub_org, confined, inside_read_roots, local_path
from prunelab.config import settings
from prunelab.data import hub
from prunelab.data.corpora import BUILTIN_CORPORA, FALLBACK_SOURCE, HubSource, fallback_text
from prunelab.data.formats import (
    RECORD_SUFFIXES,
    canonical_split,
    count_words,
    detect_format,
    get_format,
    read_records,
    read_text,
    records_text,
    split_files,
    split_of_file,
    text_column,
)
from prunelab.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from prunelab.store import ArtifactStore, open_store, parse_artifact_uri
from prunelab.store.base import check_ref_name
from prunelab.store.manifest import sha256_file

log = logging.getLogger(__name__)

REF_PREFIX = "datasets/"
DATA_DIR_ENV = "PRUNELAB_DATA_DIR"  # folder of <name>/<split files>, e.g. ../shared/data
TASKS_SUBDIR = "tasks"  # $PRUNELAB_DATA_DIR/tasks/<task>/<split>.jsonl: lm-eval task data


@dataclass(frozen=True)
class SplitInfo:
    file: str  # file name inside the artifact
    sha256: str
    size: int  # bytes
    rows: int  # non-empty lines (text) or records (jsonl, alpaca)
    words: int
    source: str = ""  # how the stored file was made from the imported one, when not a byte copy


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
    column: str | None = None,
) -> DatasetRef:
    """Store file or folder `path` as dataset `name` and point `datasets/<name>` at it.

    `kind` is the stored format (text, jsonl or alpaca). By default it is detected
    from the file, except that the built-in corpora (wikitext2, ptb, wikipassages) are always text.
    Records (JSONL, JSON, Parquet: the hub's exports) stored as text become one row
    per line, from `column` or the `text` / `sentence` column; records without one
    are refused before anything is stored. `split` names the split a single file
    holds (else its file name must say, as in valid.tokens); with a folder it picks
    that one split out of it.
    """
    store = store or open_store()
    ref_name = _ref_name(name)
    sources = _split_sources(Path(path), split)
    first = next(iter(sources.values()))
    wants_text = column is not None or name in BUILTIN_CORPORA
    fmt = get_format(kind or ("text" if wants_text else detect_format(first)))
    if column is not None and fmt.name != "text":
        raise InvalidArgument(f"--column picks the text of a text corpus; format {fmt.name!r} keeps whole records", field="column")
    with tempfile.TemporaryDirectory(prefix="prunelab-dataset-") as staging_dir:
        staging = Path(staging_dir)
        splits = {s: _stage_split(fmt.name, s, src, staging, column) for s, src in sources.items()}
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
    """The text of `split` of a corpus, one row per line, from the first that has it:
    the store, a local file or folder, `$PRUNELAB_DATA_DIR/<name>/`, the hub (when
    it answers; `hub.py`), and for the built-in corpora the embedded fallback text.

    What the user put in place (an import, a folder) wins over the hub, so a run
    reads the same text with or without a network. Records (jsonl, Parquet, the
    hub's rows) read as their `text` / `sentence` column, one row per line."""
    split = canonical_split(split)
    local = _local_split(name_or_path, split, store, want="text")
    if local is not None:
        return _file_text(local)
    corpus = BUILTIN_CORPORA.get(name_or_path)
    if corpus is None:
        check_hub_org(name_or_path, field="dataset")
    source = corpus.hub if corpus else HubSource(name_or_path, None, "text")
    try:
        rows = hub.dataset_rows(source.path, source.config, source.split_to_read(split))
        return records_text(source.rows_of(rows, split), source.text_field if corpus else None)
    except Unavailable as err:
        if corpus is None:
            raise _not_available(name_or_path, split, err.reason) from None
        return _fallback(name_or_path, split, err.reason)


def load_records(name: str, split: str, store: ArtifactStore | None = None) -> list[dict[str, Any]]:
    """The records of `split` of a jsonl or alpaca dataset: from the store, a local
    file or folder, `$PRUNELAB_DATA_DIR/<name>/`, or the hub when it answers."""
    split = canonical_split(split)
    local = _local_split(name, split, store, want="records")
    if local is not None:
        return read_records(local)
    check_hub_org(name, field="dataset")
    try:
        return hub.dataset_rows(name, None, split)
    except Unavailable as err:
        raise _not_available(name, split, err.reason) from None


def find_task_data(task: str, store: ArtifactStore | None = None) -> DatasetRef | None:
    """The stored lm-eval data of `task`, imported first from `$PRUNELAB_DATA_DIR/tasks/<task>/`
    when the store lacks it (content-addressed: every process that imports it gets the
    same artifact); None if neither has it."""
    store = store or open_store()
    try:
        return get_dataset(task, store)
    except InvalidArgument:  # not even a valid dataset name
        return None
    except NotFound:
        data_dir = settings().data_dir
        folder = data_dir / TASKS_SUBDIR / task if data_dir else None
        if folder is None or not folder.is_dir():
            return None
        log.info("task %s: importing its data from %s", task, folder)
        return import_dataset(task, folder, kind="jsonl", store=store)


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


def _stage_split(fmt: str, split: str, source: Path, staging: Path, column: str | None) -> SplitInfo:
    """Validate `source` as `fmt` and write it to `staging/<split><ext>`: byte for
    byte, except JSON arrays and Parquet, which become JSONL, and records stored as
    text, which become their text column, one row per line."""
    data_format = get_format(fmt)
    target = staging / f"{split}{data_format.extension}"
    how = ""
    if fmt == "text" and source.suffix in RECORD_SUFFIXES:
        records = read_records(source)
        column = text_column(records, column)
        target.write_text(records_text(records, column), encoding="utf-8")
        how = f"{source.name}: column {column!r} of {len(records)} records, one row per line"
        rows = data_format.read_rows(target)
    else:
        rows = data_format.read_rows(source)
        if fmt != "text" and source.suffix != ".jsonl":
            target.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
            how = f"{source.name}: {len(rows)} records as JSON lines"
        else:
            shutil.copyfile(source, target)
    if not rows:
        raise InvalidArgument(f"{source.name} holds no {fmt} rows", field="path")
    return SplitInfo(target.name, sha256_file(target), target.stat().st_size, len(rows), count_words(rows), how)


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


def _local_split(name: str, split: str, store: ArtifactStore | None, want: str) -> Path | None:
    """The file for `split` of `name` that needs no hub: stored, a local path, or in the data dir."""
    return _stored_split_file(name, split, store, want) or local_split_file(name, split)


def local_split_file(name: str, split: str) -> Path | None:
    """The file for `split` of `name` as a local path or in `$PRUNELAB_DATA_DIR`, as far
    as the caller may read it (prunelab.access); None if there is none."""
    return _local_split_file(local_path(name, field="dataset"), canonical_split(split)) or _data_dir_split_file(name, canonical_split(split))


def _stored_split_file(name: str, split: str, store: ArtifactStore | None, want: str) -> Path | None:
    """The stored file for `split` of dataset `name`, or None if no such dataset."""
    store = store or open_store()
    try:
        dataset = get_dataset(name, store)
    except (NotFound, InvalidArgument):  # not imported, or not even a dataset name (a path)
        return None
    if want == "records" and dataset.format == "text":
        raise InvalidArgument(f"dataset {name!r} is a text corpus, not records; read it with resolve_text", field="name")
    if want == "text" and dataset.format == "alpaca":
        raise InvalidArgument(f"dataset {name!r} is an instruction set (alpaca), not a text corpus", field="name")
    if split not in dataset.splits:
        raise FailedPrecondition(
            f"dataset {name!r} has no {split!r} split (it has {', '.join(sorted(dataset.splits))}); "
            f"add it with: prunelab data import {name} PATH --split {split}",
            field="split",
        )
    return store.get_dir(dataset.uri) / dataset.splits[split].file


def _local_split_file(path: Path | None, split: str) -> Path | None:
    if path is None:
        return None
    if path.is_file():
        return path
    if path.is_dir():
        return split_files(path).get(split)
    return None


def _data_dir_split_file(name: str, split: str) -> Path | None:
    data_dir = settings().data_dir
    if data_dir is None or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    path = data_dir / name
    if path.exists() and confined():
        inside_read_roots(path, name, field="dataset")  # a symlink out of the data folder is refused
    return _local_split_file(path, split)


def _file_text(path: Path) -> str:
    """A corpus file's text, one row per line: text files as they are, records as their text column."""
    if path.suffix in RECORD_SUFFIXES:
        return records_text(read_records(path))
    return read_text(path)


def _fallback(name: str, split: str, reason: str) -> str:
    log.warning(
        "%s (%s): no stored copy, none in $%s, hub not used (%s). Using the embedded fallback corpus, "
        "%s, which is NOT %s: its perplexities are not comparable to published ones. "
        "To use the real corpus: prunelab data import %s PATH --split %s",
        name, split, DATA_DIR_ENV, reason, FALLBACK_SOURCE, name, name, split,
    )
    return fallback_text(split)


def _not_available(name: str, split: str, reason: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"dataset {name!r} ({split}) is not in the store, on disk or in ${DATA_DIR_ENV}, and the hub cannot be "
        f"used ({reason}); import it with: prunelab data import {name} PATH --split {split}",
        field="name",
    )
