"""A finished study's report: Markdown, one CSV per table, JSON with everything, and
PNG plots, in one folder that is also stored as an artifact of kind "report" (ref
`reports/<study id>`).

Tables follow the study: the base model's evaluation (Table 2), parameters asked vs
got (Table 3), perplexity and accuracy per method and ratio with tuned rows (Tables
4-6, one per pruning scheme), the pruning families side by side at equal nonzero
parameters, tuning, cost and speed (Table 7) and timing. Wherever parameters appear,
the nonzero ones stand beside them: a sparse model keeps every dense parameter, its
zeros included, so only the nonzero count says what it kept. Every
measurement row in measurements.csv carries its provenance: the checkpoint's
sha256 and the protocol (corpus, split, seq_len, windows, dataset sha256; task n,
shots, task and lm-eval versions).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab.export.gguf_file import FFN_BLOCK
from prunelab.orchestrate.plots import draw_plots
from prunelab.orchestrate.results import ModelResults, collect
from prunelab.orchestrate.state import DONE, FAILED, JobRow, StudyRow
from prunelab.store import open_store

ARTIFACT_KIND = "report"
REF_PREFIX = "reports/"
MIB = 1024 * 1024
# Accuracy tables: metric -> (table number, what it shows), as the seed study's Tables 5 and 6.
ACCURACY_METRICS = {"acc": ("5", "acc"), "acc_norm": ("6", "acc_norm (acc where a task has none)")}
NONZERO_NOTE = ("Nonzero kept %: parameters not exactly zero (the profiler's count, else the pruner's), as a share of the "
                "base model's parameters. A sparse model keeps every dense parameter (Params kept 100 %); its nonzero "
                "share is what it really kept and what compares with a structured model's.")


@dataclass
class Table:
    name: str  # the CSV's file stem
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", _markdown_row(self.columns), _markdown_row(["---"] * len(self.columns))]
        lines += [_markdown_row([_cell(value) for value in row]) for row in self.rows]
        return "\n".join(lines + ([""] + [f"- {note}" for note in self.notes] if self.notes else []))

    def write_csv(self, folder: Path) -> None:
        with open(folder / f"{self.name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.columns)
            writer.writerows(self.rows)

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes}


def write_report(study: StudyRow, jobs: list[JobRow], folder: Path) -> dict[str, Any]:
    """Write the report into `folder` (replacing an earlier one) and store it; returns
    the artifact's reference and the folder."""
    models = collect(jobs)
    ppl_keys = _ppl_keys(study.spec)
    tasks = [task for task in (study.spec["evaluation"] or {}).get("tasks", []) if any(task in model.tasks for model in models)]
    tables = [
        _quality_table("table2_base", "Table 2 — the base model", [m for m in models if m.role == "base"], ppl_keys, tasks),
        _params_table(models),
        *_quality_tables(models, ppl_keys, tasks),
        *[_accuracy_table(models, tasks, metric) for metric in ACCURACY_METRICS if tasks],
        _families_table(models, ppl_keys, tasks),
        _recovery_table(models, ppl_keys, tasks),
        _efficiency_table(models),
        _engines_table(models),
        _exports_table(models),
        _timing_table(models),
        _jobs_table(jobs),
    ]
    tables = [table for table in tables if table.rows]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    plots = draw_plots(models, ppl_keys, tasks, folder)
    measurements = _measurements(models)
    for table in [*tables, measurements]:
        table.write_csv(folder)
    notes = _notes(study, models, jobs, tasks)
    (folder / "report.md").write_text(_markdown(study, jobs, tables, notes, plots), encoding="utf-8")
    document = {
        "study": {"id": study.id, "name": study.name, "source": study.source, "spec": study.spec},
        "notes": notes,
        "tables": {table.name: table.as_json() for table in [*tables, measurements]},
        "plots": plots,
        "written_at": time.time(),
    }
    (folder / "report.json").write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    store = open_store()
    meta = {"study_id": study.id, "name": study.name}
    artifact = store.put_dir(folder, ARTIFACT_KIND, meta)
    store.set_ref(f"{REF_PREFIX}{study.id}", artifact.uri, meta)
    return {"uri": artifact.uri, "digest": artifact.digest, "kind": artifact.kind, "size_bytes": artifact.size, "dir": str(folder)}


# ---- tables


def _quality_tables(models: list[ModelResults], ppl_keys: list[tuple[str, int]], tasks: list[str]) -> list[Table]:
    """One table per pruning scheme, each with the base model on top; pruned rows by
    ratio then method, each followed by its tuned version."""
    base = [m for m in models if m.role == "base"]
    schemes = list(dict.fromkeys(m.scheme for m in models if m.role != "base"))
    tables = []
    for letter, scheme in zip("abcdefghijklmnopqrstuvwxyz", schemes, strict=False):
        number = "4" if len(schemes) == 1 else f"4{letter}"
        rows = sorted((m for m in models if m.scheme == scheme), key=_pruned_order)
        tables.append(_quality_table(f"table{number}_quality", f"Table {number} — quality, {scheme}", base + rows, ppl_keys, tasks))
    return tables


def _pruned_order(model: ModelResults) -> tuple:
    return (model.facts["ratio"], model.facts["method"], model.role == "tuned")


def _accuracy_table(models: list[ModelResults], tasks: list[str], metric: str) -> Table:
    """The seed's Tables 5/6: every model's zero-shot score per task and their mean."""
    number, title = ACCURACY_METRICS[metric]
    table = Table(f"table{number}_{metric}", f"Table {number} — zero-shot accuracy, {title}",
                  ["Model", "Ratio asked %", *tasks, "Mean", "Mean ± (stderr)"])
    ordered = [m for m in models if m.role == "base"] + sorted((m for m in models if m.role != "base"), key=lambda m: (m.scheme, *_pruned_order(m)))
    for model in ordered:
        scores = [model.accuracy(task, metric) for task in tasks]
        table.rows.append([model.label, _percent(model.facts.get("ratio")), *[None if s is None else s[0] for s in scores],
                           model.average_accuracy(tasks, metric), model.average_stderr(tasks, metric)])
    if metric == "acc_norm":
        table.notes.append("acc_norm (length-normalised) where lm-eval defines it; BoolQ and WinoGrande have only acc, "
                           "which stands in for it, as in LLM-Pruner's tables.")
    table.notes.append("Shares of documents answered correctly (0-1). Mean: over the tasks; its stderr combines each "
                       "task's bootstrap stderr from lm-eval, tasks taken as independent.")
    return table


def _quality_table(name: str, title: str, models: list[ModelResults], ppl_keys: list[tuple[str, int]], tasks: list[str]) -> Table:
    columns = ["Model", "Ratio asked %", "Params kept %", "Nonzero kept %"] + [f"PPL {c}@{s}" for c, s in ppl_keys]
    table = Table(name, title, columns + [f"{t} acc" for t in tasks] + (["Average acc"] if tasks else []) + ["Checkpoint sha256"])
    for model in models:
        row = [model.label, _percent(model.facts.get("ratio")), _percent(model.params_kept), _percent(model.nonzero_kept)]
        row += [model.perplexity[key].ppl if key in model.perplexity else None for key in ppl_keys]
        row += [model.tasks[task].acc if task in model.tasks else None for task in tasks]
        row += ([model.average_accuracy(tasks)] if tasks else []) + [model.checkpoint_sha256[:12]]
        table.rows.append(row)
    if tasks:
        table.notes.append(f"Average acc: mean acc over {', '.join(tasks)}; empty unless every one was scored.")
    return table


def _params_table(models: list[ModelResults]) -> Table:
    table = Table("table3_params", "Table 3 — parameters removed: asked vs got",
                  ["Model", "Method", "Variant", "Semantics", "Pattern", "Attn layers", "MLP layers", "Asked %",
                   "Got % (whole model)", "Params before", "Params after", "Nonzero after", "Nonzero kept %", "Prune s",
                   "Peak memory MiB"])
    for model in models:
        if model.role != "pruned" or model.prune is None:
            continue
        prune, facts = model.prune, model.facts
        table.rows.append([
            model.label, facts["method"], facts["variant"] or "–", facts["semantics"], model.pattern or "–", facts["attn_layers"],
            facts["mlp_layers"], _percent(prune["ratio_asked"]), _percent(prune["ratio_got"]), int(prune["params_before"]),
            int(prune["params_after"]), model.nonzero_params, _percent(model.nonzero_kept), prune["wall_seconds"],
            int(prune["peak_memory_bytes"]) / MIB,
        ])
    table.notes.append("Got % is 1 - params after / params before over the whole model, embeddings and head included; "
                       "layer_ratio asks for a share of the chosen layers only, as LLM-Pruner does.")
    table.notes.append(NONZERO_NOTE)
    return table


def _families_table(models: list[ModelResults], ppl_keys: list[tuple[str, int]], tasks: list[str]) -> Table:
    """Every model by its nonzero parameters kept, highest first, so structured and
    sparse models of (near) equal nonzero count sit next to each other."""
    table = Table("table_families", "Families at equal nonzero parameters",
                  ["Model", "Family", "Method", "Pattern", "Nonzero kept %", "Params kept %"]
                  + [f"PPL {c}@{s}" for c, s in ppl_keys] + (["Mean acc"] if tasks else []))
    if all(model.role == "base" for model in models):
        return table
    by_share = sorted(models, key=lambda m: (m.nonzero_kept is None, -(m.nonzero_kept or 0.0), m.role != "base", m.label))
    for model in by_share:
        method = model.facts.get("method", "") + (f"-{model.facts['variant']}" if model.facts.get("variant") else "")
        row = [model.label, model.family or "base", method or "–", model.pattern or "–", _percent(model.nonzero_kept),
               _percent(model.params_kept)]
        row += [model.perplexity[key].ppl if key in model.perplexity else None for key in ppl_keys]
        table.rows.append(row + ([model.average_accuracy(tasks)] if tasks else []))
    table.notes.append("Structured pruning (taylor, l1, l2, random, ...) removes heads and channels: smaller dense matrices, "
                       "faster on dense kernels. Sparse pruning (magnitude, wanda, sparsegpt) zeroes weights inside the dense "
                       "shapes, unstructured or N:M (N zeros in every M consecutive inputs), its layer sparsities uniform or "
                       "from OWL; it runs at dense speed on dense kernels (Table 7).")
    table.notes.append(NONZERO_NOTE)
    if tasks:
        table.notes.append(f"Mean acc: over {', '.join(tasks)}; empty unless every one was scored.")
    return table


def _recovery_table(models: list[ModelResults], ppl_keys: list[tuple[str, int]], tasks: list[str]) -> Table:
    """Every tuning run: what trained on which objective and how many tokens, and what it bought."""
    ppl_key = ppl_keys[0] if ppl_keys else None
    table = Table("table_tuning", "Recovery: tuning runs", [
        "Model", "Run", "Trained", "Objective", "Trainable params", "Tokens", "Tune s", "Held-out PPL before",
        "Held-out PPL after", "Selection PPL before", "Selection PPL after",
        *([f"PPL {ppl_key[0]}@{ppl_key[1]} after"] if ppl_key else []), *(["Mean acc after"] if tasks else []),
        "Best step", "Steps run", "Stop", "Why", "Checkpoint sha256"])
    for model in models:
        if model.tune is None:
            continue
        tune = model.tune
        after = [model.perplexity[ppl_key].ppl if ppl_key in model.perplexity else None] if ppl_key else []
        table.rows.append([
            model.label, model.facts.get("tuning", ""), tune.get("trained") or "lora", tune.get("objective") or "ce",
            int(tune.get("trainable_params") or 0) or None, int(tune.get("tokens_seen") or 0) or None, tune["wall_seconds"],
            tune.get("heldout_ppl_before"), tune.get("heldout_ppl_after"), tune["val_ppl_before"], tune["val_ppl_after"],
            *after, *([model.average_accuracy(tasks)] if tasks else []), int(tune["best_step"]),
            f"{int(tune['steps_run'])}/{int(tune['total_steps'])}", tune["stop"], tune["reason"], model.checkpoint_sha256[:12],
        ])
    table.notes.append("Perplexity on the tuner's validation text, split in two: the selection half chose the step (the guard "
                       "returns the best evaluated step, the input included, so its 'after' can only be lower), the held-out "
                       "half was never looked at while tuning and is the honest figure of recovery.")
    table.notes.append("Trained: LoRA adapters or every parameter (full). Objective: ce, next-token loss; kd, distillation from "
                       "the unpruned model; kd+ce, both. Tokens: labelled training tokens seen, so runs compare at equal tokens.")
    return table


def _efficiency_table(models: list[ModelResults]) -> Table:
    profiled = [model for model in models if model.profile_row is not None]
    batch_sizes = [int(batch["batch_size"]) for batch in profiled[0].profile_row["batches"]] if profiled else []
    columns = ["Model", "Params", "Params %", "Nonzero params", "Nonzero %", "MACs", "MACs %", "Nonzero MACs", "Nonzero MACs %",
               "Memory MiB", "Memory %", "Checkpoint MiB"]
    for size in batch_sizes:
        columns += [f"b{size} prefill ms", f"b{size} decode tok/s", f"b{size} prefill speedup", f"b{size} decode speedup"]
    table = Table("table7_efficiency", "Table 7 — parameters, MACs, memory, latency and speedup", columns)
    for model in profiled:
        row = model.profile_row
        base_row = model.role == "base"
        nonzero_params, nonzero_macs = _int_or_none(row.get("nonzero_params")), _int_or_none(row.get("nonzero_macs"))
        cells = [model.label, int(row["params"]), _percent(1.0 if base_row else row["params_ratio"]), nonzero_params,
                 _percent(_own_share(nonzero_params, row["params"]) if base_row else row.get("nonzero_params_ratio")),
                 int(row["macs"]), _percent(1.0 if base_row else row["macs_ratio"]), nonzero_macs,
                 _percent(_own_share(nonzero_macs, row["macs"]) if base_row else row.get("nonzero_macs_ratio")),
                 None if row["memory_bytes"] is None else row["memory_bytes"] / MIB,
                 _percent(1.0 if base_row and row["memory_bytes"] is not None else row["memory_ratio"]),
                 row["checkpoint_bytes"] / MIB]
        for batch in row["batches"]:
            cells += [batch["prefill_ms"], batch["decode_tokens_per_s"], batch["prefill_speedup"], batch["decode_speedup"]]
        table.rows.append(cells)
    table.notes.append("MACs: one forward pass of one sequence of the profile's seq_len. Memory: peak while running it "
                       "(CPU: RSS increase; GPU: max allocated). Latency: medians; speedups are medians of per-round ratios "
                       "against the base model timed in the same process, alternating with it.")
    table.notes.append("Nonzero params: parameters not exactly zero. Nonzero MACs: the MACs less one per token for every zero "
                       "weight of a linear layer, what an ideal sparse kernel would do.")
    from prunelab.profile import DENSE_KERNELS_NOTE, is_sparse  # imports torch: only when the report is written

    if any(row.get("nonzero_params") is not None and is_sparse(int(row["params"]), int(row["nonzero_params"]))
           for row in (model.profile_row for model in profiled)):
        table.notes.append(DENSE_KERNELS_NOTE)
    return table


def _engines_table(models: list[ModelResults]) -> Table:
    """Batch-1 speed in each engine the study profiled in, with its speedup over the base
    model in the same engine; empty (left out) when torch was the only one."""
    engines = sorted({engine for model in models for engine in model.engine_rows})
    columns = ["Model", "torch prefill ms", "torch decode tok/s", "torch prefill speedup", "torch decode speedup"]
    for engine in engines:
        columns += [f"{engine} prefill ms", f"{engine} decode tok/s", f"{engine} prefill speedup", f"{engine} decode speedup"]
    table = Table("table_engines", "Speed where it is served — batch 1, each engine against the base model in itself", columns)
    for model in (m for m in models if m.engine_rows):
        cells = [model.label, *_batch_one(model.profile_row)]
        for engine in engines:
            cells += _batch_one(model.engine_rows.get(engine))
        table.rows.append(cells)
    table.notes.append("llama.cpp: each model exported to GGUF (the profile's gguf_type) and timed in llama-cpp-python, "
                       "alternating with the exported base model in the same process; medians of per-round ratios.")
    return table


def _batch_one(row: dict[str, Any] | None) -> list[Any]:
    batch = next((b for b in (row or {}).get("batches", []) if int(b["batch_size"]) == 1), None)
    if batch is None:
        return [None] * 4
    return [batch["prefill_ms"], batch["decode_tokens_per_s"], batch["prefill_speedup"], batch["decode_speedup"]]


def _exports_table(models: list[ModelResults]) -> Table:
    table = Table("table_exports", "Exports — files to serve", ["Model", "Format", "Type", "Architecture", "Size MiB", "Artifact"])
    table.rows = [[model.label, "gguf", model.export["outtype"], model.export["architecture"], int(model.export["size_bytes"]) / MIB,
                   model.export["artifact"]["uri"]] for model in models if model.export is not None]
    table.notes.append("GGUF for llama.cpp, Ollama and LM Studio: `prunelab artifact get URI --out DIR` fetches model.gguf. "
                       "Architecture deci: per-layer widths (llama.cpp's DeciLM loader); llama: uniform layers. "
                       f"Pruned feed-forward widths are padded with zero channels to whole blocks of {FFN_BLOCK} (outputs unchanged).")
    return table


def _own_share(part: int | None, whole: Any) -> float | None:
    """A base model's nonzero share of its own dense count (its profile has no baseline to divide by)."""
    return None if part is None else part / int(whole)


def _int_or_none(value: Any) -> int | None:
    """A count from a result's JSON (Struct numbers arrive as floats); None when an older result lacks it."""
    return None if value is None else int(value)


def _timing_table(models: list[ModelResults]) -> Table:
    kinds = ["prune", "tune", "evaluate", "profile", "export"]
    table = Table("table_timing", "Timing (wall seconds of the jobs that produced each model's results)",
                  ["Model", *[f"{kind} s" for kind in kinds], "Total s"])
    for model in models:
        seconds = [model.seconds.get(kind) for kind in kinds]
        if any(seconds):
            table.rows.append([model.label, *seconds, sum(s for s in seconds if s)])
    table.notes.append("Results reused from an identical earlier job count that job's time.")
    return table


def _jobs_table(jobs: list[JobRow]) -> Table:
    table = Table("jobs", "Jobs", ["Job", "Key", "Kind", "State", "Attempts", "Reused from", "Seconds", "Inputs sha256", "Error"])
    table.rows = [[job.id, job.key, job.kind, job.state, job.attempts, job.cached_from, job.duration_s, job.inputs_hash, job.error]
                  for job in jobs]
    return table


def _measurements(models: list[ModelResults]) -> Table:
    """Every number with its provenance, one row each."""
    table = Table("measurements", "Measurements", [
        "model", "role", "method", "variant", "semantics", "pattern", "attn_layers", "mlp_layers", "ratio_asked", "params_kept",
        "nonzero_kept",
        "measure", "name", "value", "stderr", "seq_len", "split", "windows", "tokens", "dataset_sha256", "fallback_corpus",
        "n", "num_fewshot", "task_version", "lm_eval_version", "checkpoint_sha256", "evaluation",
    ])
    for model in models:
        facts = model.facts
        identity = [model.label, model.role, facts.get("method", ""), facts.get("variant", ""), facts.get("semantics", ""),
                    model.pattern, facts.get("attn_layers", ""), facts.get("mlp_layers", ""), facts.get("ratio"), model.params_kept,
                    model.nonzero_kept]
        for p in model.perplexity.values():
            table.rows.append(identity + ["ppl", p.corpus, p.ppl, None, p.seq_len, p.split, p.windows, p.tokens,
                                          p.dataset_sha256, p.fallback, None, None, None, None, model.checkpoint_sha256, p.evaluation_uri])
        for t in model.tasks.values():
            table.rows.append(identity + ["acc", t.task, t.acc, t.acc_stderr, None, None, None, None, None, None, t.n,
                                          t.num_fewshot, t.task_version, model.lm_eval_version, model.checkpoint_sha256, t.evaluation_uri])
    return table


# ---- the Markdown document


def _markdown(study: StudyRow, jobs: list[JobRow], tables: list[Table], notes: list[str], plots: list[str]) -> str:
    done = sum(job.state == DONE for job in jobs)
    reused = sum(bool(job.cached_from) for job in jobs)
    spec = study.spec
    header = [
        f"# Study {study.name}",
        "",
        f"- id `{study.id}`, from `{study.source}`; model `{spec['model']}`",
        f"- jobs: {done} of {len(jobs)} done ({reused} reused from identical earlier jobs), "
        f"{sum(job.state == FAILED for job in jobs)} failed",
        f"- calibration: {spec['calibration']['dataset']} ({spec['calibration']['split']}), {spec['calibration']['samples']} "
        f"windows of {spec['calibration']['seq_len']} tokens",
        "- files: report.json (everything), measurements.csv (every number with its provenance), one CSV per table",
    ]
    sections = ["\n".join(header)]
    if notes:
        sections.append("## Notes\n\n" + "\n".join(f"- {note}" for note in notes))
    sections += [table.markdown() for table in tables if table.name != "jobs"]
    if plots:
        sections.append("## Plots\n\n" + "\n\n".join(f"![{name}]({name})" for name in plots))
    return "\n\n".join(sections) + "\n"


def _notes(study: StudyRow, models: list[ModelResults], jobs: list[JobRow], tasks: list[str]) -> list[str]:
    notes = list(study.notes)
    fallback = sorted({f"{p.corpus} ({p.split})" for m in models for p in m.perplexity.values() if p.fallback})
    if fallback:
        notes.append(
            f"{', '.join(fallback)} resolved to the embedded fallback corpus (CPython's Language Reference prose): these "
            "perplexities are NOT comparable to published ones. Import the real text with `prunelab data import "
            "wikitext2 PATH --split validation` or set PRUNELAB_DATA_DIR."
        )
    if any(model.tuned_on_fallback for model in models):
        tuning = study.spec["tuning"]["settings"]
        same_text = (tuning["data"], tuning.get("data_split", "train")) == (study.spec["calibration"]["dataset"], study.spec["calibration"]["split"])
        notes.append(
            f"Tuning text {tuning['data']} resolved to the embedded fallback corpus"
            + (" (the pruners' calibration reads the same dataset and split)" if same_text else "")
            + f": import the real one with `prunelab data import {tuning['data']} PATH --split train` for comparable numbers."
        )
    protocol = study.spec["evaluation"] or {"perplexity": None, "tasks": []}
    if protocol["perplexity"]:
        ppl = protocol["perplexity"]
        windows = f"the first {ppl['max_windows']} windows" if ppl["max_windows"] else "every window"
        notes.append(f"Perplexity: {ppl['split']} split, non-overlapping windows of seq_len tokens, {windows} (LLM-Pruner's protocol).")
    if tasks:
        notes.append(_tasks_protocol(protocol, models, tasks))
    model_note = _model_note(study.spec["model"])
    if model_note:
        notes.append(f"Model: {model_note}.")
    notes += [f"failed: {job.key}: {job.error}" for job in jobs if job.state == FAILED]
    return notes


def _tasks_protocol(protocol: dict[str, Any], models: list[ModelResults], tasks: list[str]) -> str:
    versions = sorted({model.lm_eval_version for model in models if model.lm_eval_version})
    counts = sorted({score.n for model in models for score in model.tasks.values()})
    limit = f"the first {protocol['limit']} documents of each task" if protocol["limit"] else "every document"
    # The widest a binomial share's stderr gets, at p = 0.5, for the fewest documents scored.
    widest = 100 * math.sqrt(0.25 / counts[0]) if counts and counts[0] else None
    return (
        f"Tasks: lm-eval {', '.join(versions) or '(version unknown)'}, {protocol['num_fewshot']}-shot, {limit} "
        f"(n = {', '.join(map(str, counts))}), lm-eval's prompts and metrics unchanged; acc and acc_norm "
        f"(Tables 5 and 6). Data: {', '.join(tasks)} as lm-eval evaluates them (each evaluation.json names the data source and sha256 of every split)."
        + (f" With n = {counts[0]}, one task's stderr is up to ±{widest:.1f} points; differences smaller than "
           "about twice the stderr are noise." if widest else "")
    )


def _model_note(model: str) -> str:
    from prunelab.models.registry import registered_model  # imports torch: only when the report is written

    entry = registered_model(model)
    return entry.note if entry else ""


def _ppl_keys(spec: dict[str, Any]) -> list[tuple[str, int]]:
    ppl = (spec["evaluation"] or {}).get("perplexity")
    return [(corpus, seq_len) for corpus in ppl["corpora"] for seq_len in ppl["seq_lens"]] if ppl else []


def _percent(share: float | None) -> float | None:
    return None if share is None else round(share * 100, 2)


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"

