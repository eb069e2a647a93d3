"""Dataset file formats and split naming.

A format knows its stored file extension, how to read a file into rows, and what a
valid row is. Formats register themselves with `@data_format`; adding one is one
function, no branch elsewhere.

- text:   UTF-8 text (a corpus); rows are its non-empty lines.
- jsonl:  one JSON object per line (lm-eval task data in its HF schema).
- alpaca: instruction sets, records {"instruction", "input" (optional), "output"}.
Record formats also read a JSON array of objects (alpaca_data.json) and Parquet
(the hub's export format); they are stored as JSONL either way. Records with a
text column (`text`, WikiText's; `sentence`, PTB's; or one named) also read as a
text corpus, one row per line (`records_text`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab.errors import InvalidArgument

# Canonical split name -> names it is also known by (file names like valid.tokens,
# ptb.valid.txt or wiki.valid.tokens mean "validation").
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
_SPLIT_NAME = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
# The columns that hold a corpus's text in the hub's schemas, in order of preference.
TEXT_COLUMNS = ("text", "sentence")


@dataclass(frozen=True)
class DataFormat:
    name: str
    extension: str  # of the stored file
    read_rows: Callable[[Path], list[Any]]  # raises InvalidArgument naming the line


FORMATS: dict[str, DataFormat] = {}


def data_format(name: str, extension: str):
    """Register the decorated row reader as format `name`."""

    def register(read_rows: Callable[[Path], list[Any]]) -> Callable[[Path], list[Any]]:
        FORMATS[name] = DataFormat(name, extension, read_rows)
        return read_rows

    return register


def get_format(name: str) -> DataFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise InvalidArgument(f"unknown dataset format {name!r}; use one of {', '.join(FORMATS)}", field="format") from None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})", field="path") from None


@data_format("text", ".txt")
def _text_rows(path: Path) -> list[str]:
    return [line for line in read_text(path).splitlines() if line.strip()]


@data_format("jsonl", ".jsonl")
def read_records(path: Path) -> list[dict]:
    """JSON objects, one per line, a JSON array of objects (a .json file), or a
    Parquet file's rows."""
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        rows = _json_array(path, text)
        bad = next((i for i, row in enumerate(rows, start=1) if not isinstance(row, dict)), None)
        if bad:
            raise InvalidArgument(f"{path} record {bad} is not a JSON object", field="path")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"{path} line {number} is not JSON: {err.msg}", field="path") from None
        if not isinstance(row, dict):
            raise InvalidArgument(f"{path} line {number} is a JSON {type(row).__name__}, not an object", field="path")
        rows.append(row)
    return rows


@data_format("alpaca", ".jsonl")
def _alpaca_rows(path: Path) -> list[dict]:
    rows = read_records(path)
    for number, row in enumerate(rows, start=1):
        problem = alpaca_problem(row)
        if problem:
            raise InvalidArgument(f"{path} record {number}: {problem}", field="path")
    return rows


def alpaca_problem(row: Any) -> str | None:
    """Why `row` is not an alpaca record, or None if it is one."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            return f"'{key}' must be a string"
    if not isinstance(row.get("input", ""), str):
        return "'input' must be a string when present"
    return None


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow  # a dependency of `datasets`; imported here, not at CLI start-up
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as err:
        raise InvalidArgument(f"{path} is not a Parquet file: {err}", field="path") from None


def text_column(rows: list[dict], column: str | None = None) -> str:
    """The column of `rows` that holds their text: `column`, else the first of
    TEXT_COLUMNS every row has as a string. InvalidArgument naming the columns if none."""
    candidates = (column,) if column else TEXT_COLUMNS
    for name in candidates:
        if rows and all(isinstance(row.get(name), str) for row in rows):
            return name
    found = sorted(rows[0]) if rows else []
    wanted = f"column {column!r}" if column else f"a {' or '.join(repr(c) for c in TEXT_COLUMNS)} column"
    raise InvalidArgument(f"the records have no string {wanted} in every row (columns: {', '.join(found) or 'none'})", field="column")


def records_text(rows: list[dict], column: str | None = None) -> str:
    """The text of a corpus given as rows: each row's text on its own line(s), in order,
    as the rows of the hub's WikiText-2 / PTB are the lines of the original files. So a
    corpus reads the same from Hugging Face rows as from its plain-text file."""
    name = text_column(rows, column)
    return "".join(row[name].removesuffix("\n") + "\n" for row in rows)


def _json_array(path: Path, text: str) -> list[Any]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"{path} is not JSON: {err.msg} (line {err.lineno})", field="path") from None
    if not isinstance(rows, list):
        raise InvalidArgument(f"{path} holds a JSON {type(rows).__name__}, not a list of records", field="path")
    return rows


def detect_format(path: Path) -> str:
    """text unless the file is JSON(L) or Parquet; alpaca if its records are all alpaca records."""
    if path.suffix not in RECORD_SUFFIXES:
        return "text"
    rows = read_records(path)
    return "alpaca" if rows and all(alpaca_problem(row) is None for row in rows) else "jsonl"


def count_words(rows: list[Any]) -> int:
    """Whitespace-separated words in every string a row holds."""
    return sum(len(value.split()) for row in rows for value in _strings(row))


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def canonical_split(name: str) -> str:
    """`valid`, `val`, `dev` -> `validation`, and so on; other names must be simple."""
    lowered = name.strip().lower() if isinstance(name, str) else ""
    for canonical, aliases in SPLIT_ALIASES.items():
        if lowered in aliases:
            return canonical
    if not _SPLIT_NAME.fullmatch(lowered):
        raise InvalidArgument(f"split {name!r} must be lowercase letters, digits or '_'", field="split")
    return lowered


def split_of_file(path: Path) -> str | None:
    """The split a file's name says it holds (`ptb.valid.txt`, the hub's
    `validation-00000-of-00001.parquet` -> validation), if any."""
    parts = re.split(r"[.\-]", path.name.lower())
    matches = {canonical for canonical, aliases in SPLIT_ALIASES.items() if any(p in aliases for p in parts)}
    return matches.pop() if len(matches) == 1 else None


def split_files(folder: Path) -> dict[str, Path]:
    """The split files directly inside `folder`, by canonical split."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        split = split_of_file(path)
        if split is None:
            continue
        if split in found:
            raise InvalidArgument(
                f"{folder} has two files for split {split!r}: {found[split].name} and {path.name}", field="path"
            )
        found[split] = path
    return found
