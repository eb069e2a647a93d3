"""`prunelab data import NAME PATH` and `prunelab data list`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prunelab.data import DatasetRef

# prunelab.data's FORMATS, spelled out: importing it loads the S3 client (~0.3 s) and
# `prunelab --help` must answer at once (tests/test_cli_help.py keeps the two equal).
FORMAT_NAMES = ("alpaca", "jsonl", "text")
STORE_HELP = "another store: s3://bucket[/prefix] (keys from PRUNELAB_S3_*), file:///path or a path; default: PRUNELAB_STORE"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="import and list datasets", description=__doc__)
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    importer = commands.add_parser("import", help="store a file or folder as a named dataset")
    importer.add_argument("name", help="dataset name, e.g. wikitext2 or my-org/instructions")
    importer.add_argument("path", type=Path, help="a file (one split) or a folder of <split> files")
    importer.add_argument("--split", help="the split a single file holds (default: from its name, e.g. valid.txt)")
    importer.add_argument(
        "--format", choices=FORMAT_NAMES,
        help="default: detected from the file; always text for the built-in corpora (wikitext2, ptb, wikipassages)",
    )
    importer.add_argument(
        "--column", help="store records (.jsonl/.json/.parquet) as a text corpus from this column "
        "(default for text: 'text', else 'sentence')",
    )
    where = importer.add_mutually_exclusive_group()
    where.add_argument("--orchestrator", metavar="HOST:PORT", help="into a deployment's store: upload through its orchestrator")
    where.add_argument("--store", metavar="URL", help=STORE_HELP)
    importer.set_defaults(handler=_import)

    lister = commands.add_parser("list", help="list stored datasets")
    lister.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    lister.add_argument("--store", metavar="URL", help=STORE_HELP)
    lister.set_defaults(handler=_list)


def _import(args: argparse.Namespace) -> int:
    if args.orchestrator:
        return _import_remote(args)
    from prunelab.cli.artifact import chosen_store
    from prunelab.data import import_dataset

    store = chosen_store(args.store)
    dataset = import_dataset(args.name, args.path, split=args.split, kind=args.format, column=args.column, store=store)
    splits = ", ".join(f"{s} ({info.rows} rows, {info.words} words)" for s, info in sorted(dataset.splits.items()))
    print(f"{dataset.name}: {dataset.format}, {splits} -> {dataset.uri}")
    return 0


def _import_remote(args: argparse.Namespace) -> int:
    from prunelab.orchestrate.transfer import upload_dataset
    from prunelab.rpc import domain_errors, make_channel
    from prunelab.v1.orchestrator_pb2_grpc import OrchestratorStub

    with make_channel(args.orchestrator) as channel, domain_errors():
        dataset = upload_dataset(OrchestratorStub(channel), args.name, args.path, args.split, args.format)
    splits = ", ".join(f"{s.name} ({s.rows} rows, {s.words} words)" for s in dataset.splits)
    print(f"{dataset.name}: {dataset.format}, {splits} -> {dataset.dataset.uri} (in the store of {args.orchestrator})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from prunelab.cli.artifact import chosen_store
    from prunelab.data import list_datasets

    datasets = list_datasets(chosen_store(args.store))
    if args.json:
        print(json.dumps([asdict(d) | {"size": d.size} for d in datasets], indent=2))
    else:
        print(_table(["NAME", "FORMAT", "SPLITS", "SIZE", "DIGEST"], [_row(d) for d in datasets]))
    return 0


def _row(dataset: DatasetRef) -> list[str]:
    return [dataset.name, dataset.format, ",".join(sorted(dataset.splits)), _human_size(dataset.size), dataset.digest[:12]]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip() for line in [header, *rows])


def _human_size(size: int) -> str:
    """Decimal units, as disks and S3 consoles show them: 1.1 MB."""
    units = ["B", "KB", "MB", "GB", "TB"]
    exponent = min(len(str(size)) - 1, 3 * (len(units) - 1)) // 3
    return f"{size} B" if exponent == 0 else f"{size / 1000**exponent:.1f} {units[exponent]}"
