"""lm-eval tasks, unmodified, on an already loaded model: task lookup, where each
task's documents come from, one `lm_eval.simple_evaluate` call, and the scores.

Only the data source is ever swapped. A task whose name is also a stored jsonl
dataset (`prunelab data import boolq boolq-validation.jsonl --split validation`,
records in the task's Hugging Face schema) is built by lm-eval's TaskManager from
its own YAML, overridden the way an lm-eval group overrides a member task: the
`json` builder with the stored files as `data_files`, and any split that was not
imported set to None. Prompts, metrics and versions stay lm-eval's. Task data found
in `$PRUNELAB_DATA_DIR/tasks/<task>/` is imported into the store on first use; any
other task reads lm-eval's own dataset from the hub, refused up front when the hub
cannot be reached (offline mode, no network).
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prunelab.data import DatasetRef, find_task_data, hub
from prunelab.errors import FailedPrecondition, InvalidArgument, Unavailable
from prunelab.store import open_store

if TYPE_CHECKING:  # lm-eval takes seconds to import; only the functions that run it do
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

# The study's zero-shot table and its headline number: mean `acc` over these tasks.
STUDY_TASKS = ("boolq", "hellaswag", "winogrande", "arc_challenge", "openbookqa")
STUDY_METRIC = "acc"
DEFAULT_SEED = 1234  # lm-eval's own default for the numpy, torch and few-shot seeds
# lm-eval builds the member tasks of a group with the group's overrides; this
# one-member group carries the data-source override and is then discarded.
_OVERRIDE_GROUP = "prunelab_stored_data"
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
_DEFAULT_FILTER = "none"  # lm-eval's name for "no filter" in its "metric,filter" keys

RequestProgress = Callable[[str, int, int], None]  # (task, requests answered, requests total)


@dataclass(frozen=True)
class TaskData:
    """Where a task's documents came from, for provenance."""

    source: str  # "store:artifact://..." or "hub:<dataset_path>[/<dataset_name>]"
    splits: dict[str, str] = field(default_factory=dict)  # split -> sha256 (stored data only)


@dataclass(frozen=True)
class PreparedTask:
    """A requested name, built by lm-eval: one task, or a group or tag of several."""

    name: str
    built: list[Any]  # lm-eval Task or Group objects, as simple_evaluate takes them
    leaf_tasks: list[str]  # the tasks whose requests run, in lm-eval's order
    data: TaskData


@dataclass(frozen=True)
class TaskScore:
    task: str
    n: int  # documents scored
    num_fewshot: int
    version: str
    metrics: dict[str, float]  # every numeric entry of lm-eval's row, keyed as lm-eval writes them ("acc,none")

    def metric(self, name: str) -> float | None:
        return self.metrics.get(f"{name},{_DEFAULT_FILTER}")


@dataclass(frozen=True)
class StudyAverage:
    metric: str
    tasks: tuple[str, ...]
    value: float


@functools.cache
def task_manager() -> TaskManager:
    """lm-eval's task index, built once per process (it parses ~15,000 YAML files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def prepare_tasks(names: Sequence[str], *, num_fewshot: int) -> list[PreparedTask]:
    """Check every name and build its task(s) with their data source. Raises before any
    model work: InvalidArgument for unknown names, FailedPrecondition for data that
    is missing while offline."""
    if not names:  # perplexity-only jobs: indexing lm-eval's ~15k task files costs 20-50 s
        return []
    manager = task_manager()
    for name in names:
        if name not in manager.task_index:
            raise InvalidArgument(_unknown_task_message(name, manager.all_tasks), field="tasks")
    return [_prepare(manager, name, num_fewshot) for name in dict.fromkeys(names)]


def run_tasks(lm: Any, prepared: Sequence[PreparedTask], *, limit: int | None, num_fewshot: int, seed: int) -> dict[str, Any]:
    """lm-eval's result dictionary for the prepared tasks, evaluated in one call."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[built for task in prepared for built in task.built],
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager(),
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def task_scores(results: dict[str, Any]) -> list[TaskScore]:
    """One score per row of lm-eval's results block (tasks, and groups where asked)."""
    return [
        TaskScore(
            task=name,
            n=int(results["n-samples"].get(name, {}).get("effective", 0)),
            num_fewshot=int(results["n-shot"].get(name) or 0),
            version=str(results["versions"].get(name, "")),
            metrics={key: float(value) for key, value in row.items() if _is_metric_value(key, value)},
        )
        for name, row in results["results"].items()
    ]


def study_average(scores: Sequence[TaskScore]) -> StudyAverage | None:
    """Mean `acc` over STUDY_TASKS; None unless every one of them was scored (shards of a
    study merge their scores first)."""
    by_task = {score.task: score.metric(STUDY_METRIC) for score in scores}
    values = [by_task.get(task) for task in STUDY_TASKS]
    if any(value is None for value in values):
        return None
    return StudyAverage(STUDY_METRIC, STUDY_TASKS, sum(values) / len(values))


# ---- progress


class _RequestCounter:
    """lm-eval's models call their cache hook once per answered request; it is the only
    per-request signal lm-eval gives, so counting those calls measures progress."""

    def __init__(self, task: str, total: int, report: RequestProgress):
        self.task, self.total, self.done, self.report = task, total, 0, report

    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        self.done += 1
        self.report(self.task, self.done, self.total)


def progress_lm(model: Any, tokenizer: Any, *, batch_size: int, report: RequestProgress) -> Any:
    """lm-eval's HFLM on the loaded model, answering each task's requests in turn so
    that `report(task, done, total)` follows every request. The scoring is HFLM's own."""
    from lm_eval.models.huggingface import HFLM

    class ProgressHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._per_task(super().loglikelihood, requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._per_task(super().loglikelihood_rolling, requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._per_task(super().generate_until, requests)

        def _per_task(self, answer: Callable[..., list], requests: list) -> list:
            positions: dict[str, list[int]] = {}
            for position, request in enumerate(requests):
                positions.setdefault(request.task_name, []).append(position)
            answers: list[Any] = [None] * len(requests)
            for task, task_positions in positions.items():
                self.set_cache_hook(_RequestCounter(task, len(task_positions), report))
                report(task, 0, len(task_positions))
                # Our own progress replaces lm-eval's tqdm bars.
                task_answers = answer([requests[p] for p in task_positions], disable_tqdm=True)
                for position, task_answer in zip(task_positions, task_answers, strict=True):
                    answers[position] = task_answer
            return answers

    return ProgressHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")


# ---- preparing one task


def _prepare(manager: TaskManager, name: str, num_fewshot: int) -> PreparedTask:
    entry = manager.task_index[name]
    stored = find_task_data(name)
    if stored is not None and entry.kind.name == "TASK":
        return _with_stored_data(manager, name, entry.cfg, stored, num_fewshot)
    unreachable = hub.unreachable_reason()
    if unreachable:
        raise FailedPrecondition(_no_hub_message(name, entry, num_fewshot, unreachable), field="tasks")
    source = f"hub:{_hub_dataset(entry.cfg or {})}"
    try:
        loaded = manager.load([name])
    except (OSError, TimeoutError) as err:  # network and missing-dataset errors; anything else is a bug
        raise Unavailable(f"lm-eval task {name!r}: {source} could not be loaded: {type(err).__name__}: {err}") from None
    built = [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return PreparedTask(name, built, list(loaded["tasks"]), TaskData(source))


def _with_stored_data(manager: TaskManager, name: str, config: dict[str, Any], stored: DatasetRef, num_fewshot: int) -> PreparedTask:
    if stored.format != "jsonl":
        raise FailedPrecondition(
            f"dataset {name!r} is {stored.format}, but lm-eval task data must be JSON records in the task's "
            f"Hugging Face schema; import a .jsonl file: prunelab data import {name} PATH.jsonl --split SPLIT",
            field="tasks",
        )
    for split in _splits_read(config, num_fewshot):
        if split not in stored.splits:
            raise FailedPrecondition(
                f"lm-eval task {name!r} reads split {split!r} of {_hub_dataset(config)}, but the stored dataset "
                f"{name!r} has only {', '.join(sorted(stored.splits))}; add it with: "
                f"prunelab data import {name} PATH.jsonl --split {split}",
                field="tasks",
            )
    files = open_store().get_dir(stored.uri)
    overrides: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(files / info.file) for split, info in stored.splits.items()}},
    }
    overrides |= {key: None for key in _SPLIT_KEYS if config.get(key) and config[key] not in stored.splits}
    task = manager.load([{"group": _OVERRIDE_GROUP, "task": [overrides]}])["tasks"][name]
    data = TaskData(f"store:{stored.uri}", {split: info.sha256 for split, info in stored.splits.items()})
    return PreparedTask(name, [task], [name], data)


def _splits_read(config: dict[str, Any], num_fewshot: int) -> list[str]:
    """The splits lm-eval reads: the test split if the task has one, else validation
    (lm-eval's `eval_docs`), and the few-shot source when there are shots."""
    evaluated = config.get("test_split") or config.get("validation_split")
    splits = [evaluated] if evaluated else []
    if num_fewshot > 0:
        shots = config.get("fewshot_split") or config.get("training_split") or config.get("validation_split")
        if shots and shots not in splits:
            splits.append(shots)
    return splits


def _hub_dataset(config: dict[str, Any]) -> str:
    path, subset = config.get("dataset_path", "?"), config.get("dataset_name")
    return f"{path}/{subset}" if subset else str(path)


def _no_hub_message(name: str, entry: Any, num_fewshot: int, unreachable: str) -> str:
    """Why an index entry (kind TASK, PY_TASK, GROUP or TAG) cannot be read without the hub, and the fix."""
    if entry.kind.name == "TASK":
        splits = _splits_read(entry.cfg, num_fewshot)
        imports = "; ".join(f"prunelab data import {name} PATH.jsonl --split {split}" for split in splits)
        return (
            f"lm-eval task {name!r} reads {' and '.join(splits)} of the Hugging Face dataset "
            f"{_hub_dataset(entry.cfg)}, which is not stored, not in $PRUNELAB_DATA_DIR/tasks/{name}/, and the hub "
            f"cannot be used ({unreachable}); import its records (JSONL in the dataset's schema) with: {imports}"
        )
    what = {"GROUP": "group", "TAG": "tag"}.get(entry.kind.name, "Python-defined task")
    return (
        f"{name!r} is an lm-eval {what}, whose data cannot come from the store; without the hub ({unreachable}), evaluate its "
        "tasks by name after importing each one's data with `prunelab data import TASK PATH.jsonl --split SPLIT`"
    )


def _unknown_task_message(name: str, known: Sequence[str]) -> str:
    closest = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"closest: {', '.join(closest)}" if closest else f"none of lm-eval's {len(known)} task, group and tag names is close"
    return f"unknown lm-eval task {name!r}; {hint}"


def _is_metric_value(key: str, value: Any) -> bool:
    return "," in key and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
