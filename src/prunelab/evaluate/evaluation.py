"""One evaluation job: one checkpoint, some perplexity corpora and lm-eval tasks, one
stored result. The service and the CLI both run `run_evaluation`.

The result is `evaluation.json`, stored as an artifact of kind `evaluation` whose
meta names the checkpoint's sha256, and pointed at by the ref
`evaluations/<checkpoint sha256>/<evaluation digest>`: the shards of a study, run
by different replicas, each add one such ref beside the checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import prunelab
from prunelab.errors import InvalidArgument, PrunelabError
from prunelab.evaluate.perplexity import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, CorpusText, corpus_text, perplexity
from prunelab.evaluate.tasks import (
    DEFAULT_SEED,
    PreparedTask,
    StudyAverage,
    TaskScore,
    prepare_tasks,
    progress_lm,
    run_tasks,
    study_average,
    task_scores,
)
from prunelab.limits import check_limit
from prunelab.models import LoadedModel, ModelSource, load_model
from prunelab.store import ArtifactRef, ArtifactStore, open_store

log = logging.getLogger(__name__)

FORMAT = "prunelab-evaluation/1"
ARTIFACT_KIND = "evaluation"
REF_PREFIX = "evaluations/"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROGRESS_INTERVAL_S = 0.5  # at most this often per phase, besides each phase's first and last update
# lm-eval's results keys kept in evaluation.json (its `configs` hold code objects and its
# environment dump is noise).
_LM_EVAL_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "n-samples", "higher_is_better")


class EvaluationCancelled(PrunelabError):
    """The caller went away; the job stopped at its next progress point."""

    grpc_code = "CANCELLED"


@dataclass(frozen=True)
class EvaluationSpec:
    """What to evaluate and how; validated on construction."""

    model: str
    tasks: tuple[str, ...] = ()
    ppl_corpora: tuple[str, ...] = ()
    ppl_split: str = "validation"
    seq_len: int = DEFAULT_SEQ_LEN
    max_windows: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int | None = None
    num_fewshot: int = 0
    seed: int = DEFAULT_SEED
    dtype: str = "float32"
    device: str | None = None  # None: cuda when available, else cpu
    job_id: str = "-"

    def __post_init__(self) -> None:
        if not self.tasks and not self.ppl_corpora:
            raise InvalidArgument("nothing to evaluate: give tasks and/or perplexity corpora", field="tasks")
        _check_at_least(self.seq_len, 2, "seq_len")
        _check_at_least(self.batch_size, 1, "batch_size")
        _check_at_least(self.num_fewshot, 0, "num_fewshot")
        for name, kind in (("seq_len", "seq_len"), ("batch_size", "batch_size"), ("num_fewshot", "fewshot"),
                           ("max_windows", "windows"), ("limit", "task_docs")):
            if getattr(self, name) is not None:
                check_limit(kind, getattr(self, name), name)
        for name in ("max_windows", "limit"):
            if getattr(self, name) is not None:
                _check_at_least(getattr(self, name), 1, name)
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype {self.dtype!r}: use one of {', '.join(DTYPES)}", field="dtype")

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class CorpusPerplexity:
    corpus: str
    split: str
    dataset_sha256: str
    seq_len: int
    windows: int
    tokens: int
    mean_nll: float
    ppl: float
    dtype: str


@dataclass(frozen=True)
class Evaluation:
    checkpoint: ModelSource
    perplexity: list[CorpusPerplexity]
    tasks: list[TaskScore]
    average: StudyAverage | None
    document: dict[str, Any]  # evaluation.json
    artifact: ArtifactRef  # where it is stored


@dataclass(frozen=True)
class ProgressUpdate:
    phase: str  # "load", "ppl:<corpus>", "task:<task>", "store"
    fraction: float  # of the whole job, never decreasing
    message: str
    done: int
    total: int


ProgressSink = Callable[[ProgressUpdate], None]


def run_evaluation(
    spec: EvaluationSpec, *, report: ProgressSink | None = None, should_stop: Callable[[], bool] | None = None
) -> Evaluation:
    """Evaluate, store and return the result. Names, data and corpora are checked
    before the model is loaded; `should_stop` is polled at every progress point."""
    prepared = prepare_tasks(spec.tasks, num_fewshot=spec.num_fewshot)
    texts = [corpus_text(corpus, spec.ppl_split) for corpus in dict.fromkeys(spec.ppl_corpora)]
    leaf_tasks = [task for item in prepared for task in item.leaf_tasks]
    phases = _Phases(
        ["load", *(f"ppl:{text.corpus}" for text in texts), *(f"task:{task}" for task in leaf_tasks), "store"],
        report or (lambda update: None),
        should_stop or (lambda: False),
    )
    # Opened first: an unreachable store fails the job before any work, and an outage
    # during it costs the record's upload retries (PRUNELAB_S3_RETRY_S), not the evaluation.
    store = open_store()
    phases.update("load", 0, 1, f"loading {spec.model}")
    loaded = load_model(spec.model, dtype=DTYPES[spec.dtype], device=spec.resolved_device)
    phases.update("load", 1, 1, f"loaded {spec.model} ({loaded.source.kind}, sha256 {loaded.source.sha256[:12]})")
    scored = [_corpus_perplexity(loaded, text, spec, phases) for text in texts]
    lm_eval_results = _lm_eval(loaded, prepared, spec, phases) if prepared else None
    scores = task_scores(lm_eval_results) if lm_eval_results else []
    average = study_average(scores)
    document = _document(spec, loaded.source, scored, scores, average, prepared, lm_eval_results)
    phases.update("store", 0, 1, "storing evaluation.json")
    artifact = _store(store, document, loaded.source.sha256)
    phases.update("store", 1, 1, f"stored {artifact.uri}")
    return Evaluation(loaded.source, scored, scores, average, document, artifact)


def list_evaluations(checkpoint_sha256: str) -> list[str]:
    """URIs of every stored evaluation of a checkpoint (one per shard or run)."""
    return [ref.uri for ref in open_store().list_refs(f"{REF_PREFIX}{checkpoint_sha256}/")]


# ---- steps


def _corpus_perplexity(loaded: LoadedModel, text: CorpusText, spec: EvaluationSpec, phases: _Phases) -> CorpusPerplexity:
    phase = f"ppl:{text.corpus}"
    result = perplexity(
        loaded.model,
        loaded.tokenizer,
        text.text,
        seq_len=spec.seq_len,
        max_windows=spec.max_windows,
        batch_size=spec.batch_size,
        on_windows=lambda done, total: phases.update(phase, done, total, f"{text.corpus}: {done}/{total} windows"),
    )
    log.info("%s (%s, seq_len %d, %d windows): ppl %.4f", text.corpus, text.split, spec.seq_len, result.windows, result.ppl)
    return CorpusPerplexity(
        text.corpus, text.split, text.sha256, result.seq_len, result.windows, result.tokens, result.mean_nll, result.ppl, spec.dtype
    )


def _lm_eval(loaded: LoadedModel, prepared: Sequence[PreparedTask], spec: EvaluationSpec, phases: _Phases) -> dict[str, Any]:
    def on_requests(task: str, done: int, total: int) -> None:
        phases.update(f"task:{task}", done, total, f"{task}: {done}/{total} lm-eval requests")

    lm = progress_lm(loaded.model, loaded.tokenizer, batch_size=spec.batch_size, report=on_requests)
    return run_tasks(lm, prepared, limit=spec.limit, num_fewshot=spec.num_fewshot, seed=spec.seed)


def _document(
    spec: EvaluationSpec,
    source: ModelSource,
    scored: list[CorpusPerplexity],
    scores: list[TaskScore],
    average: StudyAverage | None,
    prepared: Sequence[PreparedTask],
    lm_eval_results: dict[str, Any] | None,
) -> dict[str, Any]:
    import lm_eval
    import transformers

    return {
        "format": FORMAT,
        "checkpoint": {"spec": source.spec, "kind": source.kind, "sha256": source.sha256, "base_id": source.base_id},
        "ppl": {item.corpus: asdict(item) for item in scored},
        "tasks": {score.task: asdict(score) for score in scores},
        "average": asdict(average) if average else None,
        "task_data": {item.name: asdict(item.data) for item in prepared},
        "lm_eval": {key: lm_eval_results[key] for key in _LM_EVAL_KEYS if key in lm_eval_results} if lm_eval_results else None,
        "provenance": {
            "job_id": spec.job_id,
            "producer": "evaluator",
            "prunelab_version": prunelab.__version__,
            "lm_eval_version": lm_eval.__version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "created_at": datetime.now(UTC).isoformat(),
            "checkpoint_sha256": source.sha256,
            "device": spec.resolved_device,
            **{key: value for key, value in asdict(spec).items() if key not in ("device", "job_id")},
        },
    }


def _store(store: ArtifactStore, document: dict[str, Any], checkpoint_sha256: str) -> ArtifactRef:
    meta = {
        "checkpoint_sha256": checkpoint_sha256,
        "model": document["checkpoint"]["spec"],
        "tasks": sorted(document["tasks"]),
        "ppl": sorted(document["ppl"]),
        "job_id": document["provenance"]["job_id"],
    }
    with tempfile.TemporaryDirectory(prefix="prunelab-evaluation-") as staging:
        path = Path(staging) / "evaluation.json"
        path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        artifact = store.put_file(path, ARTIFACT_KIND, meta)
    store.set_ref(f"{REF_PREFIX}{checkpoint_sha256}/{artifact.digest}", artifact.uri, meta)
    return artifact


# ---- progress


class _Phases:
    """Progress over a job's phases, each an equal share of the whole: reports a
    phase's first and last update and otherwise at most every PROGRESS_INTERVAL_S,
    and raises EvaluationCancelled at any update once `should_stop()` says so."""

    def __init__(self, phases: list[str], report: ProgressSink, should_stop: Callable[[], bool]):
        self._phases = phases
        self._report, self._should_stop = report, should_stop
        self._finished: set[str] = set()
        self._fraction = 0.0
        self._last_sent = 0.0

    def update(self, phase: str, done: int, total: int, message: str) -> None:
        if self._should_stop():
            raise EvaluationCancelled(f"evaluation cancelled during {phase}")
        now = time.monotonic()
        first, last = done == 0, total > 0 and done >= total
        if not (first or last or now - self._last_sent >= PROGRESS_INTERVAL_S):
            return
        share = 0.0 if last or total <= 0 else done / total
        if last:
            # Finishing the final phase finishes the job, even if a task had no requests to report.
            self._finished |= set(self._phases) if phase == self._phases[-1] else {phase}
        self._fraction = max(self._fraction, min(1.0, (len(self._finished) + share) / len(self._phases)))
        self._last_sent = now
        self._report(ProgressUpdate(phase, self._fraction, message, done, total))


def _check_at_least(value: int, minimum: int, name: str) -> None:
    if not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"{name} must be an integer of at least {minimum}, got {value!r}", field=name)
