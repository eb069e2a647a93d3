"""`prunelab --help` and `prunelab COMMAND --help` answer at once: building every
command's parser loads none of the heavy libraries (each costs seconds), checked in
a fresh interpreter since this test process has them loaded already."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from prunelab.cli import COMMAND_MODULES, DESCRIPTION, build_parser
from prunelab.cli import data as data_cli
from prunelab.data import FORMATS
from prunelab.evaluate import EvaluationSpec
from prunelab.profile import ProfileOptions
from prunelab.prune import PruneSettings

HEAVY = ("torch", "transformers", "lm_eval", "ptflops", "datasets", "peft")

# Runs in a fresh interpreter: every help text, then which heavy modules got loaded.
_PROBE = f"""
import contextlib, io, json, sys
from prunelab.cli import COMMAND_MODULES, main

exits = {{}}
for argv in [["--help"]] + [[command, "--help"] for command in COMMAND_MODULES]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as done:
            exits[" ".join(argv)] = done.code
print(json.dumps({{"exits": exits, "loaded": [name for name in {HEAVY!r} if name in sys.modules]}}))
"""


def test_every_help_text_builds_without_loading_a_heavy_library():
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    assert result["loaded"] == []
    assert result["exits"] == {"--help": 0, **{f"{command} --help": 0 for command in COMMAND_MODULES}}


def test_top_level_help_says_what_prunelab_is_in_a_sentence():
    shown = subprocess.run([sys.executable, "-m", "prunelab.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    assert DESCRIPTION.startswith("prunelab prunes large language models") and DESCRIPTION.endswith(".")
    assert " ".join(DESCRIPTION.split()[:6]) in " ".join(shown.stdout.split())
    assert all(command in shown.stdout for command in COMMAND_MODULES)


@pytest.mark.parametrize(("command", "defaults", "some_stated"), [
    ("profile", lambda: ProfileOptions(), {"seq_len", "batch_sizes", "dtype"}),
    ("evaluate", lambda: EvaluationSpec(model="m", tasks=("boolq",)), {"seq_len", "batch_size", "dtype"}),
    ("prune", lambda: PruneSettings(ratio=0.2), {"method", "samples", "seq_len"}),
])
def test_the_defaults_a_help_text_states_are_the_ones_that_apply(command, defaults, some_stated):
    """Commands spell their defaults out in the help (importing the dataclass that
    holds them would load torch); this keeps the two in step."""
    real = defaults()
    subparsers = build_parser(command)._subparsers._group_actions[0]
    stated = {action.dest: match.group(1) for action in subparsers.choices[command]._actions
              if (match := re.search(r"default:? ([\w.,]+)(?=[)\s]|$)", action.help or ""))
              and getattr(real, action.dest, None) is not None}
    assert some_stated <= stated.keys()
    assert stated == {dest: _spelled(getattr(real, dest)) for dest in stated}


def _spelled(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def test_the_format_choices_of_data_import_are_the_registered_formats():
    assert data_cli.FORMAT_NAMES == tuple(sorted(FORMATS))
