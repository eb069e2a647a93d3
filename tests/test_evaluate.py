"""prunelab.evaluate on tiny random models: perplexity against a hand computation of
LLM-Pruner's procedure, lm-eval task scores against lm-eval's own output on the same
model and data, offline data resolution, storage and a non-uniform pruned checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.evaluate import SENTENCES, STUDY_FIXTURE_TASKS, fixture_file, fixture_rows
from fixtures.models import tiny_causal_lm

from prunelab.config import settings
from prunelab.data import get_dataset, import_dataset
from prunelab.errors import FailedPrecondition, InvalidArgument
from prunelab.evaluate import EvaluationSpec, corpus_text, list_evaluations, perplexity, run_evaluation
from prunelab.evaluate.tasks import task_manager
from prunelab.models import LlamaFamilyAdapter, load_model, save_checkpoint
from prunelab.store import open_store

# Registered here until tests/conftest.py lists it with the other fixture plugins.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def window_nlls(model, ids: list[int], seq_len: int) -> list[list[float]]:
    """Per window, each next-token NLL, computed one window and one token at a time in float64."""
    windows = []
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        window = torch.tensor(ids[start : start + seq_len])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
        windows.append([-log_probs[t, window[t + 1]].item() for t in range(seq_len - 1)])
    return windows


# ---- perplexity


def test_perplexity_is_the_mean_nll_over_non_overlapping_windows_remainder_dropped(tiny_model, tiny_tokenizer):
    text = "\n\n".join(SENTENCES)
    ids = tiny_tokenizer(text).input_ids
    seq_len = 16
    assert len(ids) % seq_len, "the text must leave a remainder to drop"
    nlls = window_nlls(tiny_model, ids, seq_len)

    full = perplexity(tiny_model, tiny_tokenizer, text, seq_len=seq_len, batch_size=3)
    first_two = perplexity(tiny_model, tiny_tokenizer, text, seq_len=seq_len, max_windows=2, batch_size=1)

    assert (full.windows, full.tokens) == (len(ids) // seq_len, len(ids) // seq_len * (seq_len - 1))
    all_tokens = [nll for window in nlls for nll in window]
    assert full.ppl == pytest.approx(math.exp(sum(all_tokens) / len(all_tokens)), rel=1e-5)
    assert (first_two.windows, first_two.tokens) == (2, 2 * (seq_len - 1))
    assert first_two.ppl == pytest.approx(math.exp(sum(nlls[0] + nlls[1]) / (2 * (seq_len - 1))), rel=1e-5)
    assert first_two.mean_nll == pytest.approx(math.log(first_two.ppl))


def test_perplexity_does_not_depend_on_batch_size(tiny_model, tiny_tokenizer):
    text = "\n\n".join(SENTENCES)
    results = {batch: perplexity(tiny_model, tiny_tokenizer, text, seq_len=8, batch_size=batch).ppl for batch in (1, 5, 64)}
    assert results[5] == pytest.approx(results[1], rel=1e-6)
    assert results[64] == pytest.approx(results[1], rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"seq_len": 1}, "seq_len"), ({"seq_len": 100_000}, "seq_len"), ({"max_windows": 0}, "max_windows"), ({"batch_size": 0}, "batch_size")],
)
def test_perplexity_refuses_impossible_windowing(tiny_model, tiny_tokenizer, kwargs, field):
    with pytest.raises(InvalidArgument) as caught:
        perplexity(tiny_model, tiny_tokenizer, "\n\n".join(SENTENCES), **kwargs)
    assert caught.value.field == field


def test_corpus_text_joins_rows_with_blank_lines_and_hashes_the_stored_split(text_file):
    import_dataset("tiny-corpus", text_file)
    corpus = corpus_text("tiny-corpus")
    assert corpus.text == "\n\n".join(SENTENCES)
    assert corpus.sha256 == get_dataset("tiny-corpus").splits["validation"].sha256


# ---- lm-eval tasks


def lm_eval_reference(model, tokenizer, tasks: tuple[str, ...], tmp_path: Path) -> dict:
    """lm-eval alone on the fixtures, with its own way of swapping a task's data (a task
    YAML that `include`s the stock one), batch size 1 as in the run compared with."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for task in tasks:
        split = fixture_file(task).name.split(".")[1]
        config = {
            "include": str(task_manager().task_index[task].yaml_path),
            "task": task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(fixture_file(task))}},
            **{key: None for key in ("training_split", "validation_split", "test_split") if key != f"{split}_split"},
        }
        (tmp_path / f"{task}.yaml").write_text(yaml.safe_dump(config))
    return lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1),
        tasks=list(tasks),
        num_fewshot=0,
        task_manager=TaskManager(include_defaults=False, include_path=str(tmp_path)),
        log_samples=False,
    )


def test_study_tasks_score_as_lm_eval_scores_them_on_stored_data(tiny_checkpoint, stored_tasks, tmp_path):
    evaluation = run_evaluation(EvaluationSpec(model=str(tiny_checkpoint), tasks=STUDY_FIXTURE_TASKS, batch_size=1))

    loaded = load_model(str(tiny_checkpoint))
    reference = lm_eval_reference(loaded.model, loaded.tokenizer, STUDY_FIXTURE_TASKS, tmp_path)
    scores = {score.task: score for score in evaluation.tasks}
    assert list(scores) == list(STUDY_FIXTURE_TASKS)
    for task in STUDY_FIXTURE_TASKS:
        row = reference["results"][task]
        assert scores[task].metrics == {key: value for key, value in row.items() if "," in key and isinstance(value, float)}
        assert scores[task].n == reference["n-samples"][task]["effective"] == len(fixture_rows(task))
    assert {"acc,none", "acc_norm,none"} <= set(scores["arc_challenge"].metrics)
    average = evaluation.average
    assert average.tasks == ("boolq", "hellaswag", "winogrande", "arc_challenge", "openbookqa")
    assert average.value == pytest.approx(sum(scores[t].metric("acc") for t in average.tasks) / 5)


def test_progress_counts_every_lm_eval_request_per_task_and_never_goes_back(tiny_checkpoint, stored_tasks, text_file):
    updates = []
    run_evaluation(
        EvaluationSpec(model=str(tiny_checkpoint), tasks=("piqa", "arc_easy"), ppl_corpora=(str(text_file),), seq_len=8),
        report=updates.append,
    )
    phases = list(dict.fromkeys(update.phase for update in updates))
    assert phases == ["load", f"ppl:{text_file}", "task:piqa", "task:arc_easy", "store"]
    fractions = [update.fraction for update in updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    last = {update.phase: (update.done, update.total) for update in updates}
    assert last["task:piqa"] == (2 * 10, 2 * 10)  # two solutions a goal
    arc_requests = sum(len(row["choices"]["text"]) for row in fixture_rows("arc_easy"))
    assert last["task:arc_easy"] == (arc_requests, arc_requests)


def test_evaluation_is_stored_beside_the_checkpoint_with_provenance(tiny_checkpoint, stored_tasks, text_file):
    evaluation = run_evaluation(
        EvaluationSpec(model=str(tiny_checkpoint), tasks=("boolq",), ppl_corpora=(str(text_file),), seq_len=8, limit=4, job_id="job-9")
    )
    sha = evaluation.checkpoint.sha256
    stored = open_store().stat(evaluation.artifact.uri)
    assert (stored.kind, stored.meta["checkpoint_sha256"], stored.meta["job_id"]) == ("evaluation", sha, "job-9")
    assert list_evaluations(sha) == [evaluation.artifact.uri]

    document = json.loads(open_store().get_file(evaluation.artifact.uri).read_text())
    assert document["lm_eval"]["results"]["boolq"]["acc,none"] == evaluation.tasks[0].metric("acc")
    assert document["lm_eval"]["n-samples"]["boolq"] == {"original": 10, "effective": 4}
    assert document["lm_eval"]["versions"]["boolq"] == 2.0
    assert document["task_data"]["boolq"] == {
        "source": f"store:{get_dataset('boolq').uri}",
        "splits": {"validation": get_dataset("boolq").splits["validation"].sha256},
    }
    assert document["ppl"][str(text_file)]["dataset_sha256"] == corpus_text(str(text_file)).sha256
    provenance = document["provenance"]
    assert provenance["checkpoint_sha256"] == sha
    assert {k: provenance[k] for k in ("seed", "device", "dtype", "batch_size", "limit", "seq_len")} == {
        "seed": 1234, "device": "cpu", "dtype": "float32", "batch_size": 8, "limit": 4, "seq_len": 8,
    }
    assert provenance["lm_eval_version"] == "0.4.13"


def test_a_non_uniform_pruned_checkpoint_from_the_store_evaluates(tiny_tokenizer, stored_tasks, text_file, tmp_path):
    model = tiny_causal_lm()
    adapter = LlamaFamilyAdapter(model)
    adapter.keep_kv_groups(0, [0])
    adapter.keep_mlp_channels(1, range(0, 96, 3))
    adapter.keep_hidden_channels([c for c in range(64) if c % 5])
    directory = save_checkpoint(model, tiny_tokenizer, tmp_path / "pruned", {"method": "test"})
    assert len({json.dumps(w) for w in json.loads((directory / "config.json").read_text())["layer_widths"]}) > 1
    uri = open_store().put_dir(directory, "model").uri

    evaluation = run_evaluation(EvaluationSpec(model=uri, tasks=("piqa",), ppl_corpora=(str(text_file),), seq_len=8))

    assert evaluation.checkpoint.sha256 == uri.removeprefix("artifact://")
    text = corpus_text(str(text_file)).text
    assert evaluation.perplexity[0].ppl == pytest.approx(perplexity(model, tiny_tokenizer, text, seq_len=8).ppl, rel=1e-5)
    assert evaluation.tasks[0].n == 10


# ---- what is refused, before any model is loaded


def test_task_data_missing_offline_names_the_import_that_fixes_it():
    with pytest.raises(FailedPrecondition) as caught:
        run_evaluation(EvaluationSpec(model="no-such-model", tasks=("arc_challenge",)))
    reason = caught.value.reason
    assert "allenai/ai2_arc/ARC-Challenge" in reason
    assert "prunelab data import arc_challenge PATH.jsonl --split test" in reason


def test_stored_data_without_the_split_the_task_reads_is_refused(tmp_path):
    import_dataset("arc_easy", fixture_file("arc_easy"), split="validation")  # lm-eval reads test
    with pytest.raises(FailedPrecondition) as caught:
        run_evaluation(EvaluationSpec(model="no-such-model", tasks=("arc_easy",)))
    assert "prunelab data import arc_easy PATH.jsonl --split test" in caught.value.reason


def test_unknown_task_lists_the_closest_names():
    with pytest.raises(InvalidArgument) as caught:
        run_evaluation(EvaluationSpec(model="no-such-model", tasks=("helaswag",)))
    assert caught.value.reason.startswith("unknown lm-eval task 'helaswag'; closest: hellaswag")
    assert caught.value.field == "tasks"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({}, "tasks"), ({"tasks": ("boolq",), "limit": 0}, "limit"), ({"tasks": ("boolq",), "dtype": "int8"}, "dtype")],
)
def test_spec_refuses_bad_settings(kwargs, field):
    with pytest.raises(InvalidArgument) as caught:
        EvaluationSpec(model="m", **kwargs)
    assert caught.value.field == field


@pytest.mark.slow
def test_smollm2_on_shared_wikitext2_matches_the_hand_computation_and_scores_the_study(shared_data, stored_tasks, monkeypatch):
    monkeypatch.setenv("PRUNELAB_DATA_DIR", str(shared_data))
    settings.cache_clear()
    torch.set_num_threads(2)  # a 135M-parameter model does use both cores
    spec = EvaluationSpec(model="smollm2-135m", ppl_corpora=("wikitext2",), max_windows=2, tasks=STUDY_FIXTURE_TASKS[:5], limit=4)
    evaluation = run_evaluation(spec)

    text = "\n\n".join((shared_data / "wikitext2" / "valid.tokens").read_text().splitlines())
    loaded = load_model("smollm2-135m")
    nlls = window_nlls(loaded.model, loaded.tokenizer(text).input_ids[: 2 * 128], 128)
    [ppl] = evaluation.perplexity
    assert ppl.dataset_sha256 == hashlib.sha256((shared_data / "wikitext2" / "valid.tokens").read_bytes()).hexdigest()
    # float32 log-softmax over a 49,152-token vocabulary against float64 here
    assert ppl.ppl == pytest.approx(math.exp(sum(nlls[0] + nlls[1]) / 254), rel=1e-4)
    assert [score.n for score in evaluation.tasks] == [4] * 5
    assert evaluation.average is not None
