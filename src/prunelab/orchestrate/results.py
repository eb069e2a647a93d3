"""A finished study's job results, regrouped per model: what the report's tables and
plots are made of. Results are the services' result messages as JSON (protobuf
field names; int64 values arrive as strings)."""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from prunelab.data import fallback_text
from prunelab.errors import InvalidArgument
from prunelab.orchestrate.graph import EVALUATE, EXPORT, PROFILE, PRUNE, TORCH, TUNE
from prunelab.orchestrate.state import DONE, JobRow


@dataclass(frozen=True)
class Perplexity:
    corpus: str
    seq_len: int
    ppl: float
    split: str
    windows: int
    tokens: int
    dataset_sha256: str
    fallback: bool  # the corpus resolved to the embedded fallback text, not the real one
    evaluation_uri: str  # the stored evaluation.json


@dataclass(frozen=True)
class TaskAccuracy:
    task: str
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    n: int
    num_fewshot: int
    task_version: str
    evaluation_uri: str


@dataclass
class ModelResults:
    label: str
    facts: dict[str, Any]  # role (base | pruned | tuned), method, variant, ratio, semantics, attn_layers, mlp_layers
    prune: dict[str, Any] | None = None  # PruneResult of the model, or of the model it was tuned from
    tune: dict[str, Any] | None = None
    perplexity: dict[tuple[str, int], Perplexity] = field(default_factory=dict)
    tasks: dict[str, TaskAccuracy] = field(default_factory=dict)
    profile_row: dict[str, Any] | None = None  # the profiler's Table-7 row for this model (torch)
    engine_rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # other engines' rows: "llama.cpp" -> row
    export: dict[str, Any] | None = None  # ExportResult: the model as a file to serve
    checkpoint_sha256: str = ""
    lm_eval_version: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # job kind -> wall time of its jobs

    @property
    def role(self) -> str:
        return self.facts["role"]

    @property
    def scheme(self) -> str:
        """The pruning target and layers, e.g. "params_ratio 4:-2"; "" for the base model."""
        if self.role == "base":
            return ""
        if self.facts.get("pattern"):  # sparse: every layer, so the pattern is the scheme
            return f"sparsity {self.facts['pattern']}" + (" owl" if self.facts.get("allocation") == "owl" else "")
        layers = self.facts["attn_layers"] if self.facts["attn_layers"] == self.facts["mlp_layers"] else (
            f"attn {self.facts['attn_layers']} mlp {self.facts['mlp_layers']}")
        return f"{self.facts['semantics']} {layers}"

    @property
    def params_kept(self) -> float | None:
        """Parameters kept, as a share of the base model's (1.0 for the base)."""
        if self.role == "base":
            return 1.0
        if self.prune is None:
            return None
        return int(self.prune["params_after"]) / int(self.prune["params_before"])

    @property
    def nonzero_params(self) -> int | None:
        """Parameters that are not exactly zero: the profiler's count of this very model
        when it was profiled, else the pruner's (a tuned model reports the pruning it
        came from, whose zeros tuning keeps). Results from before the pruner counted
        them hold none (or proto3's unset 0): there a structured model's parameters after
        pruning stand in."""
        if self.profile_row is not None and self.profile_row.get("nonzero_params") is not None:
            return int(self.profile_row["nonzero_params"])
        if self.prune is None:
            return None
        return int(self.prune.get("nonzero_params") or 0) or int(self.prune["params_after"])

    @property
    def nonzero_kept(self) -> float | None:
        """Nonzero parameters as a share of the base model's parameters (1.0 for the base):
        what a sparse model, which keeps every dense parameter, really kept."""
        if self.role == "base":
            return 1.0
        nonzero = self.nonzero_params
        return None if nonzero is None or self.prune is None else nonzero / int(self.prune["params_before"])

    @property
    def family(self) -> str:
        """"sparse" (weights zeroed in the dense shapes), "structured" (rows, columns,
        heads removed), "" for the base model."""
        if self.role == "base":
            return ""
        return "sparse" if self.facts.get("semantics") == "sparsity" else "structured"

    @property
    def pattern(self) -> str:
        """A sparse model's zero pattern and non-uniform allocation ("2:4",
        "unstructured owl"); "" for structured and base models."""
        if self.family != "sparse":
            return ""
        allocation = self.facts.get("allocation", "uniform")
        return self.facts.get("pattern", "") + ("" if allocation in ("", "uniform") else f" {allocation}")

    @property
    def tuned_on_fallback(self) -> bool:
        """The tuning data resolved to the embedded fallback text."""
        data = (self.tune or {}).get("report", {}).get("data", {})
        return bool(data) and data.get("data_sha256") == _fallback_sha256(data.get("data_split", ""))

    def accuracy(self, task: str, metric: str) -> tuple[float, float | None] | None:
        """(value, stderr) of `task` under `metric`: "acc", or "acc_norm", which falls back
        to acc for tasks that have no length-normalised score (BoolQ, WinoGrande), as
        LLM-Pruner's tables do. None if the task was not scored."""
        score = self.tasks.get(task)
        if score is None:
            return None
        if metric == "acc_norm" and score.acc_norm is not None:
            return score.acc_norm, score.acc_norm_stderr
        return (score.acc, score.acc_stderr) if score.acc is not None else None

    def average_accuracy(self, tasks: list[str], metric: str = "acc") -> float | None:
        """Mean `metric` over `tasks`; None unless each of them was scored."""
        scores = [self.accuracy(task, metric) for task in tasks]
        return None if not scores or None in scores else sum(value for value, _ in scores) / len(scores)

    def average_stderr(self, tasks: list[str], metric: str = "acc") -> float | None:
        """The standard error of `average_accuracy`, the tasks taken as independent samples."""
        scores = [self.accuracy(task, metric) for task in tasks]
        if not scores or None in scores or any(stderr is None for _, stderr in scores):
            return None
        return math.sqrt(sum(stderr * stderr for _, stderr in scores)) / len(scores)


def collect(jobs: list[JobRow]) -> list[ModelResults]:
    """One entry per model, in the study's order (base first); from done jobs only."""
    models: dict[str, ModelResults] = {}
    for job in jobs:
        facts = dict(job.meta["model"])
        label = facts.pop("label")
        model = models.setdefault(label, ModelResults(label, facts))
        if job.state != DONE or job.result is None:
            continue
        model.seconds[job.kind] = model.seconds.get(job.kind, 0.0) + (job.duration_s or 0.0)
        _ADD[job.kind](model, job.result)
    for model in models.values():  # a tuned model reports the pruning it was tuned from
        if model.role == "tuned" and model.prune is None:
            model.prune = models[model.facts["pruned"]].prune
    return list(models.values())


def _add_prune(model: ModelResults, result: dict[str, Any]) -> None:
    model.prune = result


def _add_tune(model: ModelResults, result: dict[str, Any]) -> None:
    model.tune = result


def _add_evaluation(model: ModelResults, result: dict[str, Any]) -> None:
    model.checkpoint_sha256 = result["checkpoint_sha256"]
    uri = result["evaluation"]["uri"]
    provenance = result.get("report", {}).get("data", {}).get("provenance", {})
    model.lm_eval_version = provenance.get("lm_eval_version", model.lm_eval_version)
    for item in result["perplexity"]:
        seq_len = int(item["seq_len"])
        model.perplexity[(item["corpus"], seq_len)] = Perplexity(
            corpus=item["corpus"], seq_len=seq_len, ppl=item["ppl"], split=item["split"], windows=int(item["windows"]),
            tokens=int(item["tokens"]), dataset_sha256=item["dataset_sha256"],
            fallback=item["dataset_sha256"] == _fallback_sha256(item["split"]), evaluation_uri=uri,
        )
    for item in result["tasks"]:
        model.tasks[item["task"]] = TaskAccuracy(
            task=item["task"], acc=item.get("acc"), acc_stderr=item.get("acc_stderr"), acc_norm=item.get("acc_norm"),
            acc_norm_stderr=item.get("acc_norm_stderr"), n=int(item["n"]), num_fewshot=int(item["num_fewshot"]), task_version=item["version"], evaluation_uri=uri,
        )


def _add_profile(model: ModelResults, result: dict[str, Any]) -> None:
    model.checkpoint_sha256 = model.checkpoint_sha256 or result["model"]["sha256"]
    rows = result["report"]["data"]["rows"]
    row = next(row for row in rows if row["role"] == "model")
    engine = result.get("environment", {}).get("engine") or TORCH  # results from before engines were torch's
    if engine == TORCH:
        model.profile_row = row
    else:
        model.engine_rows[engine] = row


def _add_export(model: ModelResults, result: dict[str, Any]) -> None:
    model.export = result


_ADD = {PRUNE: _add_prune, TUNE: _add_tune, EVALUATE: _add_evaluation, PROFILE: _add_profile, EXPORT: _add_export}


@functools.cache
def _fallback_sha256(split: str) -> str:
    """What the evaluator reports as dataset_sha256 when a corpus fell back to the embedded text."""
    try:
        return hashlib.sha256(fallback_text(split).encode()).hexdigest()
    except InvalidArgument:  # a split the fallback lacks cannot have come from it
        return ""
