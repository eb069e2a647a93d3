"""The `prunelab` command. Each subcommand lives in its own module with a
`register(subparsers)` function; this file only assembles them and turns domain
errors into a message on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from prunelab.config import settings
from prunelab.errors import PrunelabError
from prunelab.logs import setup_logging

# Modules under prunelab.cli that contribute subcommands, in `--help` order.
SUBCOMMAND_MODULES = ["data", "prune", "tune", "evaluate", "profile", "study"]

EXIT_USAGE = 2  # argparse's own code for bad usage; domain errors use it too
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunelab", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"prunelab.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = settings()
        setup_logging(cfg.log_level, cfg.log_format)
        return args.handler(args) or 0
    except PrunelabError as err:
        where = f" ({err.field})" if err.field else ""
        print(f"prunelab {args.command}: error{where}: {err.reason}", file=sys.stderr)
        return EXIT_USAGE if err.grpc_code == "INVALID_ARGUMENT" else EXIT_FAILURE
    except KeyboardInterrupt:
        logging.getLogger(__name__).warning("interrupted")
        return 130
