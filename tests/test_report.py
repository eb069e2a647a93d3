"""The study report on sparse models: nonzero parameters beside the dense ones in
every parameter table, the families side by side at equal nonzero parameters, and
Table 7's nonzero MACs with the dense-kernel note. The report reads real results of
real checkpoints, evaluated and profiled by the services in this process; the pruned
models are made here, each with the prune result its pruner reports: a structured
one (narrower MLPs) and a sparse one (the dense architecture with half of every
decoder weight exactly zero)."""

from __future__ import annotations

import csv
import string
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fixtures.models import TINY_LLAMA_LINEAR_WEIGHTS, TINY_LLAMA_PARAMS, half_zeroed, tiny_causal_lm

from prunelab.models import LlamaFamilyAdapter, save_checkpoint
from prunelab.orchestrate import parse_study
from prunelab.orchestrate.dispatch import InProcessDispatcher, request_message, result_dict, run_call
from prunelab.orchestrate.graph import EVALUATE, PROFILE, PRUNE
from prunelab.orchestrate.report import write_report
from prunelab.orchestrate.state import DONE, JobRow, StudyRow
from prunelab.profile import DENSE_KERNELS_NOTE

TINY_STUDY = Path(__file__).parent / "fixtures" / "studies" / "tiny.yaml"
WORDS = "the quick brown fox jumps over the lazy dog while pruning removes heads and channels from every layer".split()
HALF_ZEROED = TINY_LLAMA_PARAMS - TINY_LLAMA_LINEAR_WEIGHTS // 2  # the stand-in's nonzero parameters
PROFILING = {"seq_len": 8, "batch_sizes": [1], "gen_tokens": 2, "repeats": 1, "warmup": 0, "skip_memory": True, "threads": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def narrowed(model: torch.nn.Module) -> torch.nn.Module:
    """Layers 1 and 2 keep 48 of their 96 MLP channels, as structured pruning of layers 1:3 does."""
    adapter = LlamaFamilyAdapter(model)
    for layer in (1, 2):
        adapter.keep_mlp_channels(layer, list(range(48)))
    return model


def run_job(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` to the kind's servicer in this process; the result as the orchestrator stores it."""
    call = InProcessDispatcher((kind,)).call(kind, request_message(kind, fields, "job"), "job")
    return result_dict(kind, run_call(call, lambda _progress: None))


def done_job(seq: int, kind: str, label: str, facts: dict[str, Any], result: dict[str, Any]) -> JobRow:
    now = time.time()
    return JobRow(id=f"job-{seq}", study_id="tiny", seq=seq, key=f"{kind} {label}", kind=kind, inputs={}, inputs_hash="",
                  needs=[], meta={"model": {"label": label, **facts}}, state=DONE, attempts=1, result=result, error="",
                  cached_from="", fraction=1.0, message="", duration_s=1.0, created_at=now, started_at=now, finished_at=now,
                  updated_at=now)


def prune_result(ratio: float, semantics: str, params_after: int, nonzero_params: int | None = None) -> dict[str, Any]:
    """A PruneResult as the orchestrator stores it (int64 as strings); without
    nonzero_params, as results from before pruners counted them."""
    result = {"job_id": "job", "artifact": {"uri": "", "digest": "", "kind": "model"}, "ratio_asked": ratio, "semantics": semantics,
              "ratio_got": 1 - params_after / TINY_LLAMA_PARAMS, "params_before": str(TINY_LLAMA_PARAMS), "params_after": str(params_after),
              "layer_widths": [], "peak_memory_bytes": "0", "memory_kind": "rss", "wall_seconds": 0.5, "report": {}}
    return result if nonzero_params is None else {**result, "nonzero_params": str(nonzero_params)}


@pytest.fixture
def text_dir(tmp_path) -> Path:
    """train/validation text: 300 lines of 12 words, varied so that windows differ."""
    folder = tmp_path / "text"
    folder.mkdir()
    lines = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(300)]
    for split in ("train", "validation"):
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_the_report_shows_nonzero_parameters_and_compares_families_at_equal_nonzero_counts(tiny_checkpoint, tiny_tokenizer,
                                                                                             text_dir, tmp_path):
    spec = yaml.safe_load(string.Template(TINY_STUDY.read_text()).substitute(MODEL=tiny_checkpoint, TEXT=text_dir))
    spec.update(tuning=None, evaluation={"perplexity": {"corpora": [str(text_dir)], "seq_lens": [8], "max_windows": 20}})
    study = parse_study(yaml.safe_dump(spec), "tiny.yaml")
    base, corpus = str(tiny_checkpoint), str(text_dir)
    sparse = str(save_checkpoint(half_zeroed(tiny_causal_lm("llama")), tiny_tokenizer, tmp_path / "wanda", {"method": "wanda"}))
    structured = str(save_checkpoint(narrowed(tiny_causal_lm("llama")), tiny_tokenizer, tmp_path / "l2", {"method": "l2"}))
    structured_after = TINY_LLAMA_PARAMS - 2 * 3 * 64 * 48

    def evaluated(model: str) -> list[tuple[str, dict[str, Any]]]:
        return [(EVALUATE, run_job(EVALUATE, {"model": model, "ppl_corpora": [corpus], "seq_len": 8, "max_windows": 20}))]

    def profiled(model: str, baseline: str) -> list[tuple[str, dict[str, Any]]]:
        return [(PROFILE, run_job(PROFILE, {"model": model, "baseline": baseline, **PROFILING}))]

    sparse_facts = {"role": "pruned", "method": "wanda", "variant": "", "ratio": 0.5, "semantics": "sparsity",
                    "attn_layers": "0:4", "mlp_layers": "0:4", "pattern": "2:4", "allocation": "uniform"}
    # where each nonzero count comes from: the base's and wanda's profiles, the old l2
    # result's parameters after pruning (not profiled, no count), magnitude's pruner
    models = [
        ("base", {"role": "base"}, evaluated(base) + profiled(base, "")),
        ("l2 20%", {"role": "pruned", "method": "l2", "variant": "", "ratio": 0.2, "semantics": "params_ratio",
                    "attn_layers": "1:3", "mlp_layers": "1:3", "pattern": ""},
         [(PRUNE, prune_result(0.2, "params_ratio", structured_after))] + evaluated(structured)),
        ("wanda 50%", sparse_facts, [(PRUNE, prune_result(0.5, "sparsity", TINY_LLAMA_PARAMS))] + evaluated(sparse) + profiled(sparse, base)),
        ("magnitude 60% owl", {**sparse_facts, "method": "magnitude", "ratio": 0.6, "pattern": "unstructured", "allocation": "owl"},
         [(PRUNE, prune_result(0.6, "sparsity", TINY_LLAMA_PARAMS, nonzero_params=TINY_LLAMA_PARAMS - 93_000))]),
    ]
    done = [(label, facts, kind, result) for label, facts, results in models for kind, result in results]
    jobs = [done_job(seq, kind, label, facts, result) for seq, (label, facts, kind, result) in enumerate(done)]
    folder = tmp_path / "report"
    write_report(StudyRow(study.id, study.name, "tiny.yaml", study.model_dump(mode="json"), DONE, [], None, "", 0.0, 0.0), jobs, folder)

    nonzero_share = {"base": 100.0, "l2 20%": round(100 * structured_after / TINY_LLAMA_PARAMS, 2),
                     "wanda 50%": round(100 * HALF_ZEROED / TINY_LLAMA_PARAMS, 2),
                     "magnitude 60% owl": round(100 * (TINY_LLAMA_PARAMS - 93_000) / TINY_LLAMA_PARAMS, 2)}
    ppl_column = f"PPL {corpus}@8"

    params = {row["Model"]: row for row in csv.DictReader(open(folder / "table3_params.csv"))}
    assert int(params["wanda 50%"]["Params after"]) == TINY_LLAMA_PARAMS
    assert int(params["wanda 50%"]["Nonzero after"]) == HALF_ZEROED  # the profiler's count of the checkpoint
    assert int(params["magnitude 60% owl"]["Nonzero after"]) == TINY_LLAMA_PARAMS - 93_000  # the pruner's
    assert int(params["l2 20%"]["Nonzero after"]) == structured_after  # its parameters after pruning stand in
    assert (params["wanda 50%"]["Pattern"], params["magnitude 60% owl"]["Pattern"], params["l2 20%"]["Pattern"]) == (
        "2:4", "unstructured owl", "–")
    assert {model: float(row["Nonzero kept %"]) for model, row in params.items()} == {
        model: share for model, share in nonzero_share.items() if model != "base"}

    quality = {row["Model"]: row for path in folder.glob("table4*_quality.csv") for row in csv.DictReader(open(path))}
    assert (float(quality["wanda 50%"]["Params kept %"]), float(quality["wanda 50%"]["Nonzero kept %"])) == (
        100.0, nonzero_share["wanda 50%"])

    families = list(csv.DictReader(open(folder / "table_families.csv")))
    assert [row["Model"] for row in families] == ["base", "l2 20%", "wanda 50%", "magnitude 60% owl"]  # by nonzero share
    assert [row["Family"] for row in families] == ["base", "structured", "sparse", "sparse"]
    assert [float(row["Nonzero kept %"]) for row in families] == list(nonzero_share.values())
    for row in families[:3]:  # the evaluated ones, with the perplexities of their quality rows
        assert row[ppl_column] == quality[row["Model"]][ppl_column] and float(row[ppl_column]) > 1
    assert families[3][ppl_column] == ""

    efficiency = {row["Model"]: row for row in csv.DictReader(open(folder / "table7_efficiency.csv"))}
    assert list(efficiency) == ["base", "wanda 50%"]
    wanda, dense = efficiency["wanda 50%"], efficiency["base"]
    assert (int(wanda["Params"]), int(wanda["Nonzero params"]), wanda["MACs"]) == (TINY_LLAMA_PARAMS, HALF_ZEROED, dense["MACs"])
    assert int(wanda["Nonzero MACs"]) == int(dense["MACs"]) - 8 * TINY_LLAMA_LINEAR_WEIGHTS // 2  # one per token per zero weight
    assert int(dense["Nonzero params"]) == TINY_LLAMA_PARAMS and float(dense["Nonzero %"]) == 100.0

    markdown = (folder / "report.md").read_text()
    assert "## Families at equal nonzero parameters" in markdown and DENSE_KERNELS_NOTE in markdown
    assert (folder / "ppl_vs_params.png").read_bytes()[:4] == b"\x89PNG"
