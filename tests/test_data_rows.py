"""Corpora in the shapes users have them (plain text, the hub's rows as JSONL or
Parquet) read back as the same text for perplexity and calibration; task data from
$PRUNELAB_DATA_DIR/tasks/; imports the readers could not use are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch

from prunelab.config import settings
from prunelab.data import find_task_data, get_dataset, hub, import_dataset, list_datasets, resolve_text
from prunelab.errors import FailedPrecondition, InvalidArgument, NotFound
from prunelab.evaluate.perplexity import corpus_text, perplexity
from prunelab.prune.calibration import calibration_windows
from prunelab.store import open_store


def hub_rows(source: Path, column: str) -> list[dict]:
    """The file's lines as the hub's rows of it: WikiText keeps each line's newline, PTB does not."""
    keep_newline = column == "text"
    return [{column: line + "\n" if keep_newline else line} for line in source.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    ("corpus", "source", "column", "writer", "file_name"),
    [
        ("wikitext2", "wikitext2/valid.tokens", "text", write_jsonl, "validation.jsonl"),
        ("wikitext2", "wikitext2/valid.tokens", "text", write_parquet, "validation-00000-of-00001.parquet"),
        ("ptb", "ptb/valid.txt", "sentence", write_jsonl, "validation.jsonl"),
    ],
)
def test_hub_rows_read_back_as_the_plain_text_file(
    tmp_path, shared_data, tiny_model, tiny_tokenizer, corpus, source, column, writer, file_name
):
    plain = shared_data / source
    rows_file = writer(tmp_path / "rows" / file_name, hub_rows(plain, column))

    dataset = import_dataset(corpus, rows_file.parent)  # a built-in corpus name: stored as text
    from_rows = corpus_text(corpus)
    import_dataset(corpus, plain, split="validation")
    from_plain = corpus_text(corpus)

    assert dataset.format == "text" and f"column '{column}'" in dataset.splits["validation"].source
    assert from_rows.text == from_plain.text and from_rows.sha256 == from_plain.sha256
    first_words = from_plain.text[:20_000]  # a tiny model and a few windows: the same text scores the same
    rows_text = from_rows.text[:20_000]
    assert perplexity(tiny_model, tiny_tokenizer, rows_text, seq_len=32, max_windows=4).ppl == pytest.approx(
        perplexity(tiny_model, tiny_tokenizer, first_words, seq_len=32, max_windows=4).ppl, rel=0
    )
    assert torch.equal(
        calibration_windows(tiny_tokenizer, rows_text, 4, 32, seed=0),
        calibration_windows(tiny_tokenizer, first_words, 4, 32, seed=0),
    )


def test_a_named_column_makes_any_records_a_corpus(tmp_path):
    rows = [{"id": 1, "body": "first line"}, {"id": 2, "body": "second line"}]
    dataset = import_dataset("notes", write_jsonl(tmp_path / "train.jsonl", rows), column="body")
    assert dataset.format == "text" and resolve_text("notes", "train") == "first line\nsecond line\n"


def test_an_import_the_readers_cannot_use_is_refused_and_nothing_is_stored(tmp_path):
    rows = write_jsonl(tmp_path / "validation.jsonl", [{"passage": "no text column here"}])
    with pytest.raises(InvalidArgument, match=r"no string a 'text' or 'sentence' column in every row \(columns: passage\)"):
        import_dataset("wikitext2", rows)
    with pytest.raises(InvalidArgument, match="no string column 'body'"):
        import_dataset("notes", rows, column="body")
    with pytest.raises(InvalidArgument, match="not a Parquet file"):
        import_dataset("notes", _write(tmp_path / "test.parquet", "not parquet"))
    assert list_datasets() == [] and not list(open_store().list_refs("datasets/"))


def test_any_corpus_name_reads_from_the_data_dir(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "data" / "mycorpus" / "validation.jsonl", [{"text": "from the data dir"}])
    monkeypatch.setenv("PRUNELAB_DATA_DIR", str(tmp_path / "data"))
    settings.cache_clear()
    assert resolve_text("mycorpus") == "from the data dir\n"
    with pytest.raises(FailedPrecondition, match="not in the store"):
        resolve_text("../data/mycorpus")  # names never climb out of the data dir


def test_task_data_imports_from_the_data_dir_on_first_use(tmp_path, monkeypatch):
    rows = [{"question": "is the sky blue", "passage": "It is.", "label": 1}]
    write_jsonl(tmp_path / "data" / "tasks" / "boolq" / "validation.jsonl", rows)
    assert find_task_data("boolq") is None  # no data dir configured
    monkeypatch.setenv("PRUNELAB_DATA_DIR", str(tmp_path / "data"))
    settings.cache_clear()
    found = find_task_data("boolq")
    assert found is not None and found.format == "jsonl" and found.splits["validation"].rows == 1
    assert get_dataset("boolq").uri == found.uri  # now in the store, for every evaluator
    with pytest.raises(NotFound):
        get_dataset("hellaswag")
    assert find_task_data("hellaswag") is None


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_wikipassages_is_cut_from_boolq_test_passages_when_the_hub_answers(monkeypatch):
    passages = [f"Title {i} -- Passage number {i}." for i in range(12)]
    rows = [{"question": "q", "passage": p} for p in passages + passages[:3]]  # questions share passages
    read = []

    def hub_rows(path, config, split):  # stands in for the hub's answer
        read.append((path, config, split))
        return rows

    monkeypatch.setattr(hub, "dataset_rows", hub_rows)
    validation = resolve_text("wikipassages", "validation")
    train = resolve_text("wikipassages", "train")

    assert read == [("aps/super_glue", "boolq", "test")] * 2
    assert validation == "Passage number 4.\nPassage number 9.\n"
    assert len(train.splitlines()) == 10 and "Title" not in train and not set(train.splitlines()) & set(validation.splitlines())
    with pytest.raises(InvalidArgument, match="splits train and validation, not 'test'"):
        resolve_text("wikipassages", "test")
