"""The `prunelab` command. Each subcommand lives in its own module with a
`register(subparsers)` function; this file only assembles them and turns domain
errors into a message on stderr and a non-zero exit.

Command modules import torch, transformers and lm-eval inside their handlers, never
at module level: `prunelab --help` imports every module and must answer at once
(tests/test_cli_help.py holds them to it)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from prunelab.config import settings
from prunelab.errors import as_domain_error
from prunelab.logs import setup_logging

DESCRIPTION = (
    "prunelab prunes large language models (structured pruning with LLM-Pruner's criteria), "
    "recovers them with LoRA, and measures what pruning costs and buys: perplexity, zero-shot "
    "accuracy, size, memory and speed, one job at a time or as a whole study."
)
EPILOG = "Run `prunelab COMMAND --help` for a command's options."

# Subcommand -> the module under prunelab.cli that registers it, in `--help` order.
# Only the chosen command's module is imported.
COMMAND_MODULES = {
    "data": "data", "prune": "prune", "tune": "tune", "evaluate": "evaluate", "profile": "profile", "export": "export",
    "run": "study", "status": "study", "watch": "study", "report": "study", "cancel": "study",
    "doctor": "doctor", "artifact": "artifact", "certs": "certs",
}

EXIT_USAGE = 2  # argparse's own code for bad usage; domain errors use it too
EXIT_FAILURE = 1


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone when it is known, else for every command
    (`--help`, a typo: argparse then lists them all)."""
    parser = argparse.ArgumentParser(prog="prunelab", description=DESCRIPTION, epilog=EPILOG)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else dict.fromkeys(COMMAND_MODULES.values())
    for name in modules:
        importlib.import_module(f"prunelab.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        cfg = settings()
        setup_logging(cfg.log_level, cfg.log_format)
        return args.handler(args) or 0
    except Exception as raised:
        if (err := as_domain_error(raised)) is None:
            raise
        where = f" ({err.field})" if err.field else ""
        print(f"prunelab {args.command}: error{where}: {err.reason}", file=sys.stderr)
        return EXIT_USAGE if err.grpc_code == "INVALID_ARGUMENT" else EXIT_FAILURE
    except KeyboardInterrupt:
        logging.getLogger(__name__).warning("interrupted")
        return 130
