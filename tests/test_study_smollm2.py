"""`make run`'s study (examples/smollm2.yaml) end to end on the real SmolLM2-135M, on a
cut-down grid: the file itself with only its grid made smaller (one method, one
ratio, few windows and steps, one task on a handful of documents), run as `make run`
runs it (embedded, offline, text from ../shared/data)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from fixtures.evaluate import fixture_file

from prunelab.cli import main as cli_main
from prunelab.config import settings
from prunelab.data import import_dataset
from prunelab.orchestrate import load_study

STUDY = Path(__file__).resolve().parent.parent / "examples" / "smollm2.yaml"


def cut_down(document: dict) -> dict:
    """The same study with a smaller grid: its taylor grid at 20 % alone, 4 perplexity
    windows, 4 tuning steps, one task on 4 documents, one timed profiling round."""
    [taylor] = [grid for grid in document["pruning"] if grid["methods"] == ["taylor"]]
    document["pruning"] = [taylor | {"ratios": [0.2]}]
    document["tuning"]["settings"] |= {"steps": 4, "eval_every": 2, "max_val_examples": 4}
    document["evaluation"] |= {"tasks": ["arc_easy"], "limit": 4}
    document["evaluation"]["perplexity"]["max_windows"] = 4
    document["profiling"] |= {"repeats": 1, "warmup": 0, "gen_tokens": 2}
    return document


@pytest.mark.slow
def test_make_runs_study_on_a_cut_down_grid(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNELAB_DATA_DIR", str(shared_data))  # as `make run` sets it
    settings.cache_clear()
    import_dataset("arc_easy", fixture_file("arc_easy"))
    path = tmp_path / "smollm2.yaml"
    path.write_text(yaml.safe_dump(cut_down(yaml.safe_load(STUDY.read_text()))))
    study_id = load_study(path).id

    assert cli_main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"study {study_id}: done" in out
    folder = settings().home / "reports" / study_id
    assert "embedded fallback corpus" not in (folder / "report.md").read_text()  # real text from ../shared/data
    quality = {row["Model"]: row for row in csv.DictReader(open(folder / "table4_quality.csv"))}
    assert list(quality) == ["base", "taylor 20%", "taylor 20% +LoRA", "taylor 20% +full-kd"]
    base_ppl = float(quality["base"]["PPL wikitext2@128"])
    assert 10 < base_ppl < float(quality["taylor 20%"]["PPL wikitext2@128"])
    [params] = csv.DictReader(open(folder / "table3_params.csv"))
    assert abs(float(params["Got % (whole model)"]) - 20) < 0.5
    tuning = list(csv.DictReader(open(folder / "table_tuning.csv")))
    assert len(tuning) == 2 and all(int(run["Best step"]) in (0, 2, 4) for run in tuning)
    assert len(list(csv.DictReader(open(folder / "table7_efficiency.csv")))) == 4
    exports = list(csv.DictReader(open(folder / "table_exports.csv")))  # every model as q8_0 GGUF, as make run does
    assert [(row["Model"], row["Type"], row["Architecture"]) for row in exports] == [
        ("base", "q8_0", "llama"), ("taylor 20%", "q8_0", "deci"), ("taylor 20% +LoRA", "q8_0", "deci"),
        ("taylor 20% +full-kd", "q8_0", "deci")]
