"""The dataset registry: importing corpora, instruction sets and task data, and
resolving names to text or records, offline, on the embedded store."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from prunelab.data import (
    fallback_text,
    get_dataset,
    hub,
    import_dataset,
    list_datasets,
    load_records,
    resolve_text,
)
from prunelab.errors import FailedPrecondition, InvalidArgument, NotFound
from prunelab.store import open_store

ALPACA = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "my-corpus.valid.txt"
    path.write_text(" = Heading = \n\nThe first line of text .\n\nA second line , with five more words here .\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_real_wikitext2_imports_with_counts_and_resolves_byte_for_byte(shared_data):
    source = shared_data / "wikitext2" / "valid.tokens"

    dataset = import_dataset("wikitext2", source)  # split from the file name

    info = dataset.splits["validation"]
    assert dataset.format == "text" and list(dataset.splits) == ["validation"]
    assert info.words == 213_886  # as ../shared/README.md states
    assert info.sha256 == hashlib.sha256(source.read_bytes()).hexdigest() and info.size == source.stat().st_size
    assert resolve_text("wikitext2") == source.read_text()
    assert [d.name for d in list_datasets()] == ["wikitext2"]


def test_text_import_records_rows_words_and_sets_the_ref(corpus):
    dataset = import_dataset("tiny", corpus)

    assert dataset.splits["validation"].rows == 3 and dataset.splits["validation"].words == 19
    ref = open_store().get_ref("datasets/tiny")
    assert ref.uri == dataset.uri and ref.meta["splits"]["validation"]["words"] == 19
    assert open_store().stat(dataset.uri).kind == "dataset"
    assert get_dataset("tiny") == dataset == list_datasets()[0]


def test_importing_one_split_keeps_the_others_and_only_moves_the_pointer(tmp_path, corpus):
    first = import_dataset("tiny", corpus)
    (tmp_path / "t.txt").write_text("training words only\n")
    second = import_dataset("tiny", tmp_path / "t.txt", split="train")

    assert sorted(second.splits) == ["train", "validation"]
    assert second.splits["validation"] == first.splits["validation"]
    assert resolve_text("tiny", "train") == "training words only\n"
    assert resolve_text("tiny", "valid") == corpus.read_text()  # split aliases
    assert open_store().exists(first.uri)  # the old artifact is untouched
    assert get_dataset("tiny").uri == second.uri != first.uri

    assert import_dataset("tiny", tmp_path / "t.txt", split="train") == second  # same content, same artifact


def test_task_folder_imports_as_jsonl_splits(tmp_path):
    task = tmp_path / "boolq"
    task.mkdir()
    validation = [{"question": "is water wet", "passage": "Water is a liquid.", "label": 1}]
    write_jsonl(task / "validation.jsonl", validation)
    write_jsonl(task / "train.jsonl", validation * 3)
    (task / "README.md").write_text("not a split")

    dataset = import_dataset("boolq", task)

    assert dataset.format == "jsonl" and sorted(dataset.splits) == ["train", "validation"]
    assert dataset.splits["train"].rows == 3
    assert load_records("boolq", "validation") == validation
    assert load_records(str(task), "train") == validation * 3  # a local folder resolves too


def test_alpaca_array_is_detected_and_stored_as_jsonl(tmp_path):
    (tmp_path / "alpaca_data.json").write_text(json.dumps(ALPACA))

    dataset = import_dataset("alpaca", tmp_path / "alpaca_data.json", split="train")

    assert dataset.format == "alpaca" and dataset.splits["train"].file == "train.jsonl"
    assert dataset.splits["train"].words == 10
    assert load_records("alpaca", "train") == ALPACA
    stored = open_store().get_dir(dataset.uri) / "train.jsonl"
    assert [json.loads(line) for line in stored.read_text().splitlines()] == ALPACA


@pytest.mark.parametrize(
    "setup, call_kwargs, field, reason",
    [
        (lambda d: None, {"path": "absent.txt"}, "path", "does not exist"),
        (lambda d: (d / "corpus.txt").write_text("x"), {"path": "corpus.txt"}, "split", "pass --split"),
        (lambda d: (d / "x.valid.txt").write_text("x"), {"path": "x.valid.txt", "kind": "csv"}, "format", "unknown dataset format"),
        (lambda d: (d / "x.valid.txt").write_text("x"), {"path": "x.valid.txt", "name": "../up"}, "name", "dataset name"),
        (lambda d: (d / "x.valid.txt").write_text("x"), {"path": "x.valid.txt", "split": "Bad Split"}, "split", "lowercase"),
        (lambda d: (d / "x.valid.txt").write_bytes(b"\xff\xfe\x00"), {"path": "x.valid.txt"}, "path", "not UTF-8"),
        (lambda d: (d / "x.valid.txt").write_text("\n\n"), {"path": "x.valid.txt"}, "path", "holds no text rows"),
        (lambda d: (d / "x.valid.jsonl").write_text('{"a": 1}\n[1]\n'), {"path": "x.valid.jsonl"}, "path", "line 2 is a JSON list"),
        (
            lambda d: write_jsonl(d / "x.valid.jsonl", [{"instruction": "hi"}]),
            {"path": "x.valid.jsonl", "kind": "alpaca"},
            "path",
            "record 1: 'output' must be a string",
        ),
        (lambda d: [(d / n).write_text("x") for n in ("valid.txt", "valid.tokens")], {"path": "."}, "path", "two files for split"),
        (lambda d: (d / "notes.md").write_text("x"), {"path": "."}, "path", "no split files"),
    ],
)
def test_bad_imports_name_the_field(tmp_path, setup, call_kwargs, field, reason):
    folder = tmp_path / "in"
    folder.mkdir()
    setup(folder)
    kwargs = {"name": "x"} | call_kwargs | {"path": folder / call_kwargs["path"]}

    with pytest.raises(InvalidArgument, match=reason) as err:
        import_dataset(**kwargs)
    assert err.value.field == field
    assert list_datasets() == []


def test_resolve_text_reads_local_files_and_folders(tmp_path, corpus):
    assert resolve_text(str(corpus)) == corpus.read_text()
    assert resolve_text(str(corpus.parent), "validation") == corpus.read_text()


def test_builtin_corpus_comes_from_the_data_dir(shared_data, monkeypatch):
    monkeypatch.setenv("PRUNELAB_DATA_DIR", str(shared_data))
    assert resolve_text("ptb") == (shared_data / "ptb" / "valid.txt").read_text()
    assert resolve_text("wikitext2", "validation") == (shared_data / "wikitext2" / "valid.tokens").read_text()


def test_stored_corpus_wins_over_the_data_dir(tmp_path, corpus, monkeypatch):
    (tmp_path / "data" / "ptb").mkdir(parents=True)
    (tmp_path / "data" / "ptb" / "valid.txt").write_text("from the data dir")
    monkeypatch.setenv("PRUNELAB_DATA_DIR", str(tmp_path / "data"))
    assert resolve_text("ptb") == "from the data dir"

    import_dataset("ptb", corpus)
    assert resolve_text("ptb") == corpus.read_text()


def test_offline_builtin_falls_back_to_embedded_english_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        text = resolve_text("wikitext2")

    assert text == fallback_text("validation")
    assert len(text.split()) > 5000 and "the" in text.split()
    warning = caplog.text
    assert "NOT wikitext2" in warning and "prunelab data import wikitext2 PATH --split validation" in warning


def test_fallback_splits_are_disjoint_english_paragraphs():
    splits = {name: set(fallback_text(name).splitlines()) for name in ("train", "validation", "test")}
    assert all(len(paragraphs) > 100 for paragraphs in splits.values())
    assert not splits["train"] & splits["validation"] and not splits["validation"] & splits["test"]
    with pytest.raises(InvalidArgument, match="no split 'extra'"):
        fallback_text("extra")


def test_unknown_dataset_offline_says_which_import_fixes_it():
    with pytest.raises(FailedPrecondition, match=r"prunelab data import tatsu-lab/alpaca PATH --split train$"):
        load_records("tatsu-lab/alpaca", "train")
    with pytest.raises(FailedPrecondition, match=r"prunelab data import lambada PATH --split validation$"):
        resolve_text("lambada", "val")


def test_missing_split_of_a_stored_dataset_says_which_import_fixes_it(corpus):
    import_dataset("tiny", corpus)
    with pytest.raises(FailedPrecondition, match=r"no 'test' split \(it has validation\).*data import tiny PATH --split test"):
        resolve_text("tiny", "test")


def test_reading_a_dataset_the_wrong_way_is_refused(tmp_path, corpus):
    import_dataset("tiny", corpus)
    import_dataset("task", write_jsonl(tmp_path / "validation.jsonl", [{"a": 1}]))
    import_dataset("instructions", write_jsonl(tmp_path / "train.jsonl", ALPACA))
    with pytest.raises(InvalidArgument, match="'tiny' is a text corpus, not records"):
        load_records("tiny", "validation")
    with pytest.raises(InvalidArgument, match=r"no string a 'text' or 'sentence' column in every row \(columns: a\)"):
        resolve_text("task")
    with pytest.raises(InvalidArgument, match="'instructions' is an instruction set"):
        resolve_text("instructions", "train")


def test_records_with_a_text_column_read_as_a_corpus(tmp_path):
    import_dataset("lambada-like", write_jsonl(tmp_path / "validation.jsonl", [{"text": "one\n"}, {"text": "two"}]))
    assert get_dataset("lambada-like").format == "jsonl"  # kept as records, for lm-eval
    assert resolve_text("lambada-like") == "one\ntwo\n"  # and readable as text, one row per line


def test_online_with_the_hub_unreachable_uses_local_data_then_the_fallback(unreachable_hub, caplog):
    assert "refused" in (hub.unreachable_reason() or "").lower()
    with caplog.at_level(logging.WARNING):
        assert resolve_text("ptb", "test") == fallback_text("test")
    assert "Using the embedded fallback corpus" in caplog.text and "refused" in caplog.text.lower()
    with pytest.raises(FailedPrecondition, match=r"hub cannot be used \(hub not reachable: 127.0.0.1:\d+: Connection refused\)"):
        load_records("no-such/dataset", "train")


def test_a_bug_on_the_hub_path_propagates_instead_of_falling_back(monkeypatch):
    import datasets

    monkeypatch.setattr(hub, "unreachable_reason", lambda: None)  # the hub "answers"

    def broken_client(*args, **kwargs):
        raise TypeError("a bug in the hub path")

    monkeypatch.setattr(datasets, "load_dataset", broken_client)
    with pytest.raises(TypeError, match="a bug in the hub path"):
        resolve_text("wikitext2")


def test_get_dataset_of_unknown_name_is_not_found():
    with pytest.raises(NotFound, match="datasets/nothing"):
        get_dataset("nothing")
