"""`prunelab data import` and `prunelab data list`, in process on both backends and
once through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab.cli import main
from prunelab.data import resolve_text


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request) -> str:
    if request.param == "s3":
        request.getfixturevalue("s3_store")  # points PRUNELAB_STORE at a fresh bucket
    return request.param


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "valid.txt"
    path.write_text("the quick brown fox\njumps over the lazy dog\n")
    return path


def test_import_then_list_as_table_and_json(backend, corpus, tmp_path, capsys):
    assert main(["data", "import", "tiny", str(corpus)]) == 0
    imported = capsys.readouterr().out
    assert "tiny: text, validation (2 rows, 9 words) -> artifact://" in imported

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "test.jsonl").write_text('{"q": "2+2", "a": "4"}\n')
    assert main(["data", "import", "arith", str(tmp_path / "tasks"), "--format", "jsonl"]) == 0
    arith = capsys.readouterr().out.rsplit("artifact://", 1)[1].strip()

    assert main(["data", "list"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "FORMAT", "SPLITS", "SIZE", "DIGEST"]
    digest = imported.rsplit("artifact://", 1)[1].strip()
    assert [row.split() for row in rows] == [
        ["arith", "jsonl", "test", "23", "B", arith[:12]],
        ["tiny", "text", "validation", "44", "B", digest[:12]],
    ]

    assert main(["data", "list", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed["tiny"]["uri"] == f"artifact://{digest}" and listed["tiny"]["size"] == 44
    assert listed["tiny"]["splits"]["validation"]["words"] == 9
    assert resolve_text("tiny") == corpus.read_text()


def test_bad_import_exits_2_naming_the_field(corpus, capsys):
    assert main(["data", "import", "tiny", str(corpus), "--split", "No Such"]) == 2
    assert "prunelab data: error (split): split 'No Such' must be lowercase" in capsys.readouterr().err


def test_list_of_an_empty_store_is_just_the_header(capsys):
    assert main(["data", "list"]) == 0
    assert capsys.readouterr().out.split() == ["NAME", "FORMAT", "SPLITS", "SIZE", "DIGEST"]


def test_console_script_imports_and_lists(corpus, prunelab_home):
    script = shutil.which("prunelab", path=str(Path(sys.executable).parent)) or shutil.which("prunelab")
    if script is None:
        pytest.skip("the prunelab console script is not installed (pip install -e .)")
    env = os.environ | {"PRUNELAB_HOME": str(prunelab_home)}

    imported = subprocess.run([script, "data", "import", "tiny", str(corpus)], env=env, capture_output=True, text=True)
    listed = subprocess.run([script, "data", "list", "--json"], env=env, capture_output=True, text=True)

    assert imported.returncode == 0, imported.stderr
    assert [d["name"] for d in json.loads(listed.stdout)] == ["tiny"]
    assert (prunelab_home / "store" / "refs" / "datasets" / "tiny.json").is_file()
