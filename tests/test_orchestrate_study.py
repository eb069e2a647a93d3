"""Study files and their job graphs, without running anything: validation errors
name the file, the field path and the allowed values; the shipped examples parse;
expansion gives the jobs, dependencies and hashes the orchestrator relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prunelab.cli import main as cli_main
from prunelab.errors import InvalidArgument
from prunelab.orchestrate import graph
from prunelab.orchestrate.graph import EVALUATE, PROFILE, PRUNE, TUNE, expand
from prunelab.orchestrate.study import load_study, parse_study
from prunelab.prune.pruner import BEST

REPO = Path(__file__).resolve().parent.parent
STUDIES = Path(__file__).parent / "fixtures" / "studies"
MINIMAL = {
    "name": "mini",
    "model": "smollm2-135m",
    "pruning": {"methods": ["taylor", "l2"], "ratios": [0.2, 0.5]},
    "evaluation": {"perplexity": {"corpora": ["wikitext2"], "seq_lens": [128]}, "tasks": ["boolq", "piqa"]},
    "profiling": {},
}


def study_text(**changes) -> str:
    document = {**MINIMAL, **changes}
    return yaml.safe_dump({key: value for key, value in document.items() if value is not None})


def error_lines(text: str) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        parse_study(text, "examples/bad.yaml")
    return caught.value.reason.splitlines()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"pruning": {"methods": ["taylor", "wandda"], "ratios": [0.2]}},
         "examples/bad.yaml: pruning.methods[1]: unknown method 'wandda'; allowed: best, taylor, l1, l2, random, flap, wanda-sp, "
         "magnitude, wanda, sparsegpt"),
        ({"pruning": [{"methods": ["l2"], "ratios": [0.2]}, {"methods": ["l2"], "ratios": [1.0]}]},
         "examples/bad.yaml: pruning[1].ratios[0]: ratio must be in (0, 1), got 1.0"),
        ({"pruning": {"methods": ["l2"], "ratios": [0.2], "semantics": ["layers"]}},
         "examples/bad.yaml: pruning.semantics[0]: unknown semantics 'layers'; allowed: params_ratio, layer_ratio"),
        ({"pruning": {"methods": ["l2"], "ratios": [0.2], "ratio": 0.3}},
         "examples/bad.yaml: pruning.ratio: unknown key 'ratio'; allowed: methods, variants, ratios, semantics, layers"),
        ({"pruning": {"methods": ["taylor"], "ratios": [0.2], "variants": ["second"]}},
         "examples/bad.yaml: pruning.variants[0]: unknown taylor variant 'second'; allowed: vector, element1, element2, mix"),
        ({"model": None}, "examples/bad.yaml: model: required but missing"),
        ({"name": "My Study"}, "examples/bad.yaml: name: name 'My Study': use up to 64 lower-case letters"),
        ({"evaluation": {"tasks": []}}, "examples/bad.yaml: evaluation: nothing to evaluate"),
        ({"evaluation": None, "profiling": None}, "examples/bad.yaml: (top level): nothing to do"),
        ({"evaluation": {"tasks": ["boolq"], "missing_task_data": "download"}},
         "examples/bad.yaml: evaluation.missing_task_data: unknown missing_task_data 'download'; allowed: skip, hub"),
        ({"profiling": {"device": "gpu"}}, "examples/bad.yaml: profiling.device: device 'gpu': use cpu, cuda or cuda:N"),
        ({"tuning": {"select": [{"method": "taylor"}], "settings": {"data": "wikitext2", "lr": -1}}},
         "examples/bad.yaml: tuning.settings: lr: lr must be a positive number, got -1"),
        ({"tuning": {"select": [{"method": "taylor"}], "settings": {"data": "wikitext2", "learning_rate": 1}}},
         "examples/bad.yaml: tuning.settings: unknown key(s) 'learning_rate'; allowed: data, data_split"),
        ({"tuning": {"select": [{"method": "taylor"}], "settings": {"data": "wikitext2"}, "runs": [{}, {"objective": "distil"}]}},
         "examples/bad.yaml: tuning: runs[1].objective: unknown objective 'distil'; choose one of ce, kd, kd+ce"),
        ({"tuning": {"select": [{"method": "taylor"}], "settings": {"data": "wikitext2"}, "runs": [{"temp": 2}]}},
         "examples/bad.yaml: tuning: runs[0]: unknown key(s) 'temp'; allowed: data, data_split"),
        ({"tuning": {"select": [{"method": "taylor"}], "settings": {"data": "wikitext2"}, "runs": [{}, {"name": "LoRA", "lr": 1e-3}]}},
         "examples/bad.yaml: tuning: runs: two runs are named alike (LoRA, LoRA)"),
    ],
    ids=["method", "ratio-in-second-grid", "semantics", "unknown-key", "variant", "missing-model", "name",
         "nothing-to-evaluate", "nothing-to-measure", "task-data-policy", "device", "tune-setting", "tune-key", "run-setting",
         "run-key", "run-names"],
)
def test_each_mistake_names_the_file_the_field_path_and_the_allowed_values(changes, expected):
    lines = error_lines(study_text(**changes))
    assert any(line.startswith(expected) for line in lines), lines


def test_unquoted_layer_ranges_are_explained():
    text = study_text(pruning=None) + "pruning:\n  methods: [l2]\n  ratios: [0.2]\n  layers: [4:18]\n"
    assert error_lines(text) == [
        'examples/bad.yaml: pruning.layers[0]: write layer ranges in quotes ("4:18"): YAML reads an unquoted 4:18 as the number 258'
    ]


def test_every_mistake_of_a_file_is_reported_at_once_and_the_cli_exits_with_usage_error(capsys):
    assert cli_main(["run", str(STUDIES / "bad.yaml")]) == 2
    message = capsys.readouterr().err
    for path in ("name", "pruning.methods[1]", "pruning.ratios[1]", "pruning.layers[0]", "pruning.ratio", "tuning.settings",
                 "evaluation.dtype", "profiling.device"):
        assert f"bad.yaml: {path}: " in message, path


def test_not_yaml_and_not_a_mapping_are_refused():
    assert "not valid YAML" in error_lines("name: [unclosed")[0]
    assert "a study is a YAML mapping" in error_lines("- just\n- a list\n")[0]


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda path: path.name)
def test_the_examples_parse_and_say_how_to_run_them(example):
    study = load_study(example)
    first_line = example.read_text().splitlines()[0]
    assert first_line.startswith("# Run: prunelab run examples/") and example.name in first_line
    assert expand(study)


def test_the_default_study_is_the_promised_grid():
    study = load_study(REPO / "examples" / "smollm2.yaml")
    jobs = expand(study, frozenset(study.evaluation.tasks))  # no task data imported
    pruned = {job.key for job in jobs if job.kind == PRUNE}
    assert pruned == {"prune best 20%", "prune best 50%", "prune taylor 20%", "prune taylor 50%", "prune random 20%",
                      "prune wanda 50%", "prune sparsegpt 50%"}
    best = next(job.inputs for job in jobs if job.key == "prune best 20%")
    assert {k: best[k] for k in ("method", "allocation", "calibration", "calibration_split", "correction_method")} == {
        k: v for k, v in zip(("method", "allocation", "calibration", "calibration_split", "correction_method"),
                             (BEST["method"], BEST["allocation"], BEST["calibration"], "train", BEST["correction"]), strict=True)}
    sparse = [job.inputs for job in jobs if job.kind == PRUNE and job.inputs["method"] in ("wanda", "sparsegpt")]
    assert all(i["semantics"] == "sparsity" and i["pattern"] == "unstructured" and i["calibration"] == "ptb" for i in sparse)
    tunes = {job.key: job.inputs for job in jobs if job.kind == TUNE}
    assert list(tunes) == ["tune taylor 20% +LoRA", "tune taylor 20% +full-kd"]  # the same model, two recoveries
    lora, kd = tunes.values()
    assert (lora.get("objective", "ce"), lora.get("full", False), kd["objective"], kd["full"]) == ("ce", False, "kd", True)
    same_tokens = ("data", "data_split", "steps", "batch_size", "max_length", "max_val_examples", "eval_every")
    assert {k: lora[k] for k in same_tokens} == {k: kd[k] for k in same_tokens}
    assert sum(job.kind == PROFILE for job in jobs) == 10  # base, seven pruned, two tuned
    exports = [job for job in jobs if job.kind == graph.EXPORT]
    assert len(exports) == 10 and all(job.inputs["outtype"] == "q8_0" for job in exports)


def test_each_tuning_run_tunes_every_selected_model_as_its_own_measured_model():
    tuning = {"select": [{"method": "taylor"}], "settings": {"data": "wikitext2", "steps": 10},
              "runs": [{}, {"full": True, "objective": "kd"}, {"name": "kd-t2", "objective": "kd", "temperature": 2.0}]}
    jobs = expand(parse_study(study_text(tuning=tuning), "runs.yaml"), frozenset({"boolq", "piqa"}))
    tunes = {job.key: job for job in jobs if job.kind == TUNE}
    assert list(tunes) == [f"tune taylor {r}% +{name}" for r in (20, 50) for name in ("LoRA", "full-kd", "kd-t2")]
    kd = tunes["tune taylor 20% +full-kd"]
    assert kd.inputs["steps"] == 10 and kd.inputs["full"] is True and kd.inputs["objective"] == "kd"
    assert kd.meta["model"]["tuning"] == "full-kd" and len({job.inputs_hash for job in tunes.values()}) == 6
    evaluated = {job.meta["model"]["label"] for job in jobs if job.kind == EVALUATE}
    assert {"taylor 20% +LoRA", "taylor 20% +full-kd", "taylor 50% +kd-t2"} <= evaluated


def test_the_tinyllama_study_reproduces_the_grid_in_both_semantics():
    study = load_study(REPO / "examples" / "tinyllama-study.yaml")
    prunes = [job for job in expand(study) if job.kind == PRUNE and job.inputs["method"] != "wanda"]
    assert len(prunes) == 4 * 3 * 2
    assert {(job.inputs["semantics"], job.inputs["attn_layers"]) for job in prunes if job.inputs["semantics"] == "layer_ratio"} == {
        ("layer_ratio", "4:18")}
    assert {job.inputs["ratio"] for job in prunes} == {0.3, 0.4, 0.7}
    wanda = {job.key: job.inputs for job in expand(study) if job.kind == PRUNE and job.inputs["method"] == "wanda"}
    assert set(wanda) == {"prune wanda 50%", "prune wanda 2:4"}  # the seed's runs that failed
    assert {(i["pattern"], i["ratio"], i["samples"], i["seq_len"]) for i in wanda.values()} == {
        ("unstructured", 0.5, 128, 2048), ("2:4", 0.5, 128, 2048)}  # the grid's own calibration
    assert study.evaluation.tasks == ["boolq", "hellaswag", "winogrande", "arc_challenge", "openbookqa"]
    assert study.evaluation.perplexity.seq_lens == [2048, 128] and study.evaluation.perplexity.corpora == ["wikitext2", "ptb"]


def test_expansion_one_evaluate_job_per_corpus_seq_len_and_task_each_after_its_model():
    study = parse_study(study_text(evaluation={"perplexity": {"corpora": ["wikitext2", "ptb"], "seq_lens": [128, 64]},
                                               "tasks": ["boolq", "piqa"]}), "s.yaml")
    jobs = expand(study, frozenset({"piqa"}))
    order = {job.key: index for index, job in enumerate(jobs)}
    base_evaluations = [job for job in jobs if job.kind == EVALUATE and job.meta["model"]["role"] == "base"]
    assert sorted(job.key for job in base_evaluations) == sorted(
        [f"evaluate base ppl {c}@{s}" for c in ("wikitext2", "ptb") for s in (128, 64)] + ["evaluate base task boolq"])
    for job in jobs:
        assert all(order[need] < order[job.key] for need in job.needs), job.key
        if job.kind in (EVALUATE, PROFILE) and job.meta["model"]["role"] == "pruned":
            assert job.needs == (f"prune {job.meta['model']['label']}",)
            assert job.inputs["model"] == {"output_of": job.needs[0]}
    profile = next(job for job in jobs if job.key == "profile l2 20%")
    assert profile.inputs["baseline"] == "smollm2-135m"


def test_identical_work_has_the_same_hash_across_studies_and_different_work_does_not():
    first = {job.key: job.inputs_hash for job in expand(parse_study(study_text(), "a.yaml"))}
    renamed = {job.key: job.inputs_hash for job in expand(parse_study(study_text(name="other"), "b.yaml"))}
    assert renamed == first
    more_windows = study_text(evaluation={"perplexity": {"corpora": ["wikitext2"], "seq_lens": [128], "max_windows": 5}})
    changed = {job.key: job.inputs_hash for job in expand(parse_study(more_windows, "c.yaml"))}
    assert changed["prune taylor 20%"] == first["prune taylor 20%"]
    # the evaluation of a pruned model changes with the protocol; its hash chains to the prune job's
    assert changed["evaluate taylor 20% ppl wikitext2@128"] != first["evaluate taylor 20% ppl wikitext2@128"]
    other_seed = {job.key: job.inputs_hash for job in expand(parse_study(
        study_text(pruning={"methods": ["taylor", "l2"], "ratios": [0.2, 0.5], "seed": 1}), "d.yaml"))}
    assert other_seed["prune taylor 20%"] != first["prune taylor 20%"]
    assert other_seed["evaluate taylor 20% ppl wikitext2@128"] != first["evaluate taylor 20% ppl wikitext2@128"]
    assert other_seed["evaluate base ppl wikitext2@128"] == first["evaluate base ppl wikitext2@128"]


def test_a_new_pruner_version_changes_the_prune_jobs_and_what_reads_them_only(monkeypatch):
    """A state directory must not reuse a model an older pruner made from the same settings."""
    first = {job.key: job.inputs_hash for job in expand(parse_study(study_text(), "a.yaml"))}
    monkeypatch.setattr(graph, "PRUNER_VERSION", graph.PRUNER_VERSION + 1)
    bumped = {job.key: job.inputs_hash for job in expand(parse_study(study_text(), "a.yaml"))}
    assert bumped["prune taylor 20%"] != first["prune taylor 20%"]
    assert bumped["evaluate taylor 20% ppl wikitext2@128"] != first["evaluate taylor 20% ppl wikitext2@128"]
    assert bumped["evaluate base ppl wikitext2@128"] == first["evaluate base ppl wikitext2@128"]


def test_a_new_exporter_version_changes_the_export_jobs_only(monkeypatch):
    """A state directory must not reuse a GGUF file an older exporter wrote."""
    text = study_text(export="gguf")
    first = {job.key: job.inputs_hash for job in expand(parse_study(text, "a.yaml"))}
    monkeypatch.setattr(graph, "EXPORTER_VERSION", graph.EXPORTER_VERSION + 1)
    bumped = {job.key: job.inputs_hash for job in expand(parse_study(text, "a.yaml"))}
    changed = sorted(key for key in first if bumped[key] != first[key])
    assert changed == sorted(key for key in first if key.startswith("export ")) and changed


def test_a_tuning_selection_that_matches_nothing_is_refused():
    study = parse_study(study_text(tuning={"select": [{"method": "random"}], "settings": {"data": "wikitext2"}}), "t.yaml")
    with pytest.raises(InvalidArgument, match=r"tuning.select\[0\]: \{'method': 'random'\} matches no pruned model"):
        expand(study)


@pytest.mark.parametrize("grid, reason", [
    ({"methods": ["taylor", "wanda"], "ratios": [0.5], "allocation": "owl"}, "taylor: unknown allocation 'owl'"),
    ({"methods": ["wanda"], "ratios": [0.5], "allocation": "global"}, "wanda: allocation 'global' is not one of wanda's"),
    ({"methods": ["sparsegpt"], "ratios": [0.5], "patterns": ["2:4"], "allocation": "owl"}, "owl varies the sparsity per layer"),
    ({"methods": ["wanda"], "ratios": [0.5], "patterns": ["4:2"]}, "N:M needs 0 < N < M"),
])
def test_sparse_grid_mistakes_are_refused_with_the_pruners_reason(grid, reason):
    with pytest.raises(InvalidArgument) as caught:
        parse_study(study_text(pruning=grid), "s.yaml")
    assert reason in caught.value.reason


def test_sparse_grid_points_take_each_pattern_once_at_its_sparsity():
    study = parse_study(study_text(pruning={"methods": ["wanda", "taylor"], "ratios": [0.5, 0.6],
                                            "patterns": ["unstructured", "2:4"]}), "s.yaml")
    prunes = {job.key: job.inputs for job in expand(study) if job.kind == PRUNE}
    assert set(prunes) == {"prune wanda 50%", "prune wanda 60%", "prune wanda 2:4", "prune taylor 50%", "prune taylor 60%"}
    assert prunes["prune wanda 2:4"]["ratio"] == 0.5 and "pattern" not in prunes["prune taylor 50%"]
