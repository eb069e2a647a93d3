"""A study as a graph of jobs: prune -> (tune) -> evaluate, profile, export.

Every model of the study (the base model, each pruned model, each tuned one) gets
one evaluate job per perplexity corpus and seq_len and one per lm-eval task, so
evaluator replicas share the work, one profile job per engine against the base
model, and one export job when the study asks for files to serve.
A job's `inputs` are its request's fields (protobuf JSON names); a field whose
value is `{"output_of": KEY}` takes the model that job KEY produced.

A job's `inputs_hash` covers its kind and inputs, with every reference replaced by
the hash of the job it points to, and the fingerprint of what each model and data
name stands for when the study is submitted (orchestrate/content.py), so identical
work on identical content has the same hash across studies before anything runs;
the orchestrator reuses finished results by it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from prunelab.errors import InvalidArgument
from prunelab.export.gguf_file import EXPORTER_VERSION
from prunelab.orchestrate.study import BEST_METHOD, Layers, PruningGrid, Study
from prunelab.prune.pruner import BEST_CALIBRATION_SPLIT, PRUNER_VERSION, PruneSettings
from prunelab.prune.sparse import SPARSE_METHODS, UNSTRUCTURED, Pattern

PRUNE, TUNE, EVALUATE, PROFILE, EXPORT = "prune", "tune", "evaluate", "profile", "export"
KINDS = (PRUNE, TUNE, EVALUATE, PROFILE, EXPORT)
TORCH = "torch"  # the profiling engine whose jobs keep their inputs (and hashes) as before engines existed
REFERENCE = "output_of"
BASE_LABEL = "base"


@dataclass(frozen=True)
class ModelNode:
    """One model of the study and what the report says about it."""

    label: str  # "base", "taylor 20%", "taylor 20% +LoRA"
    spec: Any  # the base model's spec, or {"output_of": key} of the job that makes it
    facts: dict[str, Any]  # role (base | pruned | tuned), method, variant, ratio, semantics, layers


@dataclass(frozen=True)
class JobSpec:
    key: str  # unique in the study and readable: "evaluate taylor 20% ppl wikitext2@128"
    kind: str
    inputs: dict[str, Any]
    needs: tuple[str, ...]  # keys of the jobs whose outputs `inputs` refer to
    meta: dict[str, Any]  # for the report: {"model": facts and label, ...}; not hashed
    inputs_hash: str = field(default="")


def expand(study: Study, skipped_tasks: frozenset[str] = frozenset(), content: dict[str, str] | None = None) -> list[JobSpec]:
    """The study's jobs in dispatch order (each after the jobs it needs): the base
    model's evaluations and profile first, then each pruned model with its own.
    `content` (name -> fingerprint, from content.fingerprints) goes into the hashes."""
    base = ModelNode(BASE_LABEL, study.model, {"role": "base"})
    jobs = _measurements(study, base, skipped_tasks)
    pruned = _pruned_models(study)
    tuned_by_prune = _tuned_models(study, pruned)
    for prune_job, node in pruned:
        jobs += [prune_job, *_measurements(study, node, skipped_tasks)]
        for tune_job, tuned in tuned_by_prune.get(prune_job.key, []):
            jobs += [tune_job, *_measurements(study, tuned, skipped_tasks)]
    return _hashed(jobs, content or {})


def resolve(inputs: dict[str, Any], model_uris: dict[str, str]) -> dict[str, Any]:
    """`inputs` with every reference replaced by the URI of the model its job made."""
    return {name: model_uris[value[REFERENCE]] if _is_reference(value) else value for name, value in inputs.items()}


# ---- models


def _pruned_models(study: Study) -> list[tuple[JobSpec, ModelNode]]:
    points = [point for grid in study.pruning for point in _grid_points(grid)]
    structured = [p for p in points if not p["pattern"] and p["method"] != BEST_METHOD]  # best's scheme is its own
    show_scheme = len({(p["semantics"], p["attn_layers"], p["mlp_layers"]) for p in structured}) > 1
    show_variant = len({p["variant"] for p in points if p["method"] == "taylor"}) > 1
    models: dict[str, tuple[JobSpec, ModelNode]] = {}
    for grid in study.pruning:
        for point in _grid_points(grid):
            label = _pruned_label(point, show_variant, show_scheme)
            inputs = {"model": study.model, **_prune_settings(study, grid, point)}
            facts = {"role": "pruned", **point}
            key = f"{PRUNE} {label}"
            previous = models.get(key)
            if previous is not None and previous[0].inputs != inputs:
                raise InvalidArgument(f"two pruning grids give {label!r} different settings; keep one grid per method, ratio and layers")
            models[key] = (JobSpec(key, PRUNE, inputs, (), {"model": {"label": label, **facts}}), ModelNode(label, {REFERENCE: key}, facts))
    return list(models.values())


def _grid_points(grid: PruningGrid) -> list[dict[str, Any]]:
    points: dict[str, dict[str, Any]] = {}  # methods other than taylor have no variant: dedupe
    for method, ratio in itertools.product(grid.methods, grid.ratios):
        for point in _sparse_points(grid, method, ratio) if method in SPARSE_METHODS else _structured_points(grid, method, ratio):
            points[json.dumps(point, sort_keys=True)] = point
    return list(points.values())


def _structured_points(grid: PruningGrid, method: str, ratio: float) -> list[dict[str, Any]]:
    if method == BEST_METHOD:
        best = PruneSettings(ratio=ratio)
        return [{"method": method, "variant": "", "ratio": ratio, "semantics": best.semantics, "attn_layers": best.attn_layers,
                 "mlp_layers": best.mlp_layers, "pattern": "", "allocation": best.allocation}]
    return [
        {"method": method, "variant": variant if method == "taylor" else "", "ratio": ratio, "semantics": semantics,
         "attn_layers": layers.attn, "mlp_layers": layers.mlp, "pattern": "", "allocation": grid.allocation}
        for variant, semantics, layers in itertools.product(grid.variants, grid.semantics, grid.layers)
    ]


def _sparse_points(grid: PruningGrid, method: str, ratio: float) -> list[dict[str, Any]]:
    """One point per pattern; an N:M pattern's sparsity is N/M whatever the ratio."""
    return [
        {"method": method, "variant": "", "ratio": ratio if pattern == UNSTRUCTURED else Pattern.parse(pattern).sparsity,
         "semantics": "sparsity", "attn_layers": ":", "mlp_layers": ":", "pattern": pattern, "allocation": grid.allocation}
        for pattern in grid.patterns
    ]


def _pruned_label(point: dict[str, Any], show_variant: bool, show_scheme: bool) -> str:
    method = f"{point['method']}-{point['variant']}" if show_variant and point["variant"] else point["method"]
    label = f"{method} {point['ratio'] * 100:g}%"
    if point["pattern"]:
        label = f"{method} {point['pattern']}" if point["pattern"] != UNSTRUCTURED else label
        return label + (f" {point['allocation']}" if point["allocation"] != "uniform" else "")
    if show_scheme and point["method"] != BEST_METHOD:
        label += f" {point['semantics']} {_layers_text(Layers(attn=point['attn_layers'], mlp=point['mlp_layers']))}"
    return label


def _layers_text(layers: Layers) -> str:
    return layers.attn if layers.attn == layers.mlp else f"attn {layers.attn} mlp {layers.mlp}"


def _prune_settings(study: Study, grid: PruningGrid, point: dict[str, Any]) -> dict[str, Any]:
    """Every PruneRequest field spelled out, so a changed service default cannot
    silently change what a hash stands for."""
    if point["method"] == BEST_METHOD:
        return _best_settings(grid, point)
    calibration = grid.calibration or study.calibration
    return {
        "ratio": point["ratio"],
        "method": point["method"],
        "variant": point["variant"],
        "aggregation": grid.aggregation,
        "semantics": point["semantics"],
        "allocation": point["allocation"],
        "attn_layers": point["attn_layers"],
        "mlp_layers": point["mlp_layers"],
        "calibration": calibration.dataset,
        "calibration_split": calibration.split,
        "samples": calibration.samples,
        "seq_len": calibration.seq_len,
        "seed": grid.seed,
        "mode": grid.mode,
    } | _correction_settings(grid.correction) | _sparse_settings(grid, point)


def _correction_settings(correction: bool | str) -> dict[str, Any]:
    """true/false as they always were (hashes of existing studies stay); a name as correction_method."""
    return {"correction": correction} if isinstance(correction, bool) else {"correction_method": correction}


def _best_settings(grid: PruningGrid, point: dict[str, Any]) -> dict[str, Any]:
    """prunelab's best configuration at this ratio, every field spelled out (the study's
    calibration section is for the named methods: the best configuration has its own)."""
    best = PruneSettings(ratio=point["ratio"])
    return {
        "ratio": best.ratio, "method": best.method, "variant": best.variant, "aggregation": best.aggregation,
        "semantics": best.semantics, "allocation": best.allocation, "attn_layers": best.attn_layers,
        "mlp_layers": best.mlp_layers, "calibration": best.calibration, "calibration_split": BEST_CALIBRATION_SPLIT,
        "samples": best.samples, "seq_len": best.seq_len, "seed": grid.seed, "mode": best.mode,
        "correction_method": best.correction, "correction_samples": best.correction_samples,
        "correction_seq_len": best.correction_seq_len,
    }


def _sparse_settings(grid: PruningGrid, point: dict[str, Any]) -> dict[str, Any]:
    """The sparse methods' own fields (structured jobs' inputs, and hashes, stay as they were)."""
    if not point["pattern"]:
        return {}
    owl = {"owl_lambda": grid.owl_lambda, "owl_m": grid.owl_m} if point["allocation"] == "owl" else {}
    return {"pattern": point["pattern"], "mode": "block", **owl}


def _tuned_models(study: Study, pruned: list[tuple[JobSpec, ModelNode]]) -> dict[str, list[tuple[JobSpec, ModelNode]]]:
    """Prune key -> (tune job, tuned model) of each tuning run, for the pruned models `tuning.select` picks."""
    if study.tuning is None:
        return {}
    chosen: dict[str, None] = {}  # prune keys, in grid order
    for index, selection in enumerate(study.tuning.select):
        matched = [job.key for job, node in pruned if selection.matches(node.facts)]
        if not matched:
            raise InvalidArgument(
                f"tuning.select[{index}]: {selection.model_dump(exclude_none=True)} matches no pruned model of the grid "
                f"({', '.join(node.label for _, node in pruned)})"
            )
        chosen.update(dict.fromkeys(matched))
    by_key = {job.key: node for job, node in pruned}
    tuned: dict[str, list[tuple[JobSpec, ModelNode]]] = {}
    for prune_key in chosen:
        source = by_key[prune_key]
        for name, settings in study.tuning.named_runs():
            label = f"{source.label} +{name}"
            key = f"{TUNE} {label}"
            facts = {**source.facts, "role": "tuned", "pruned": source.label, "tuning": name}
            job = JobSpec(key, TUNE, {"model": source.spec, **settings}, (prune_key,), {"model": {"label": label, **facts}})
            tuned.setdefault(prune_key, []).append((job, ModelNode(label, {REFERENCE: key}, facts)))
    return tuned


# ---- measurements of one model


def _measurements(study: Study, node: ModelNode, skipped_tasks: frozenset[str]) -> list[JobSpec]:
    needs = (node.spec[REFERENCE],) if _is_reference(node.spec) else ()
    meta = {"model": {"label": node.label, **node.facts}}
    jobs = _evaluations(study, node, skipped_tasks, needs, meta) if study.evaluation is not None else []
    if study.profiling is not None:
        jobs += _profiles(study, node, needs, meta)
    if study.export is not None:
        inputs = {"model": node.spec, "format": study.export.format, "outtype": study.export.outtype}
        jobs.append(JobSpec(f"{EXPORT} {node.label}", EXPORT, inputs, needs, meta))
    return jobs


def _profiles(study: Study, node: ModelNode, needs: tuple[str, ...], meta: dict[str, Any]) -> list[JobSpec]:
    """One profile job per engine; llama.cpp's at batch size 1, its only one."""
    baseline = "" if node.facts["role"] == "base" else study.model
    options = study.profiling.model_dump(exclude={"engines", "gguf_type"})
    jobs = []
    for engine in study.profiling.engines:
        inputs = {"model": node.spec, "baseline": baseline, **options}
        if engine != TORCH:
            inputs |= {"engine": engine, "gguf_type": study.profiling.gguf_type, "batch_sizes": [1]}
        key = f"{PROFILE} {node.label}" + ("" if engine == TORCH else f" {engine}")
        jobs.append(JobSpec(key, PROFILE, inputs, needs, {**meta, "engine": engine}))
    return jobs


def _evaluations(study: Study, node: ModelNode, skipped_tasks: frozenset[str], needs: tuple[str, ...], meta: dict[str, Any]) -> list[JobSpec]:
    evaluation = study.evaluation
    common = {"batch_size": evaluation.batch_size, "dtype": evaluation.dtype, "device": evaluation.device}
    jobs = []
    if evaluation.perplexity is not None:
        ppl = evaluation.perplexity
        for corpus, seq_len in itertools.product(ppl.corpora, ppl.seq_lens):
            inputs = {"model": node.spec, "ppl_corpora": [corpus], "ppl_split": ppl.split, "seq_len": seq_len,
                      "max_windows": ppl.max_windows or 0, **common}
            what = {"measure": "ppl", "corpus": corpus, "seq_len": seq_len}
            jobs.append(JobSpec(f"{EVALUATE} {node.label} ppl {corpus}@{seq_len}", EVALUATE, inputs, needs, {**meta, **what}))
    for task in evaluation.tasks:
        if task in skipped_tasks:
            continue
        inputs = {"model": node.spec, "tasks": [task], "num_fewshot": evaluation.num_fewshot, **common}
        inputs |= {name: getattr(evaluation, name) for name in ("limit", "seed") if getattr(evaluation, name) is not None}
        jobs.append(JobSpec(f"{EVALUATE} {node.label} task {task}", EVALUATE, inputs, needs, {**meta, "measure": "task", "task": task}))
    return jobs


# ---- hashing


def _hashed(jobs: list[JobSpec], content: dict[str, str]) -> list[JobSpec]:
    hashes: dict[str, str] = {}
    result = []
    for job in jobs:
        linked = {name: {"output_of_hash": hashes[value[REFERENCE]]} if _is_reference(value) else value for name, value in job.inputs.items()}
        used = {name: content[name] for name in _strings(job.inputs) if name in content}
        hashed = {"kind": job.kind, "inputs": linked} | _code_version(job.kind) | ({"content": used} if used else {})
        canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
        hashes[job.key] = hashlib.sha256(canonical.encode()).hexdigest()
        result.append(JobSpec(job.key, job.kind, job.inputs, job.needs, job.meta, hashes[job.key]))
    return result


def _code_version(kind: str) -> dict[str, int]:
    """The version of the code that makes a job's output where a new one makes a different output."""
    if kind == PRUNE:
        return {"pruner_version": PRUNER_VERSION}
    if kind == EXPORT:
        return {"exporter_version": EXPORTER_VERSION}
    return {}


def _strings(inputs: dict[str, Any]) -> list[str]:
    return [item for value in inputs.values() for item in (value if isinstance(value, list) else [value]) if isinstance(item, str)]


def _is_reference(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {REFERENCE}
