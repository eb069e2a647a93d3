"""Evaluation: perplexity exactly as LLM-Pruner computes it and lm-eval zero-shot
accuracy, on stored checkpoints, offline, one shard per request.

`perplexity(model, tokenizer, text)` is the building block other code (the pruner's
benchmark) calls; `run_evaluation(EvaluationSpec(...))` is the whole job the
Evaluator service and `prunelab evaluate` run.
"""

from prunelab.evaluate.evaluation import (
    CorpusPerplexity,
    Evaluation,
    EvaluationCancelled,
    EvaluationSpec,
    ProgressUpdate,
    list_evaluations,
    run_evaluation,
)
from prunelab.evaluate.perplexity import PerplexityResult, corpus_text, perplexity
from prunelab.evaluate.tasks import STUDY_METRIC, STUDY_TASKS, StudyAverage, TaskScore, study_average

__all__ = [
    "STUDY_METRIC",
    "STUDY_TASKS",
    "CorpusPerplexity",
    "Evaluation",
    "EvaluationCancelled",
    "EvaluationSpec",
    "PerplexityResult",
    "ProgressUpdate",
    "StudyAverage",
    "TaskScore",
    "corpus_text",
    "list_evaluations",
    "perplexity",
    "run_evaluation",
    "study_average",
]
