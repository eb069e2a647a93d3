"""`prunelab evaluate --model M [--ppl wikitext2,ptb] [--tasks boolq,...]`: the
Evaluator service's job, run in this process (progress on stderr, results on stdout,
the evaluation stored like the service stores it)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prunelab.evaluate import Evaluation
    from prunelab.evaluate.tasks import TaskScore

_REPORTED_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
# Spelled out rather than imported so `prunelab --help` starts without torch and
# lm-eval; options left unset take EvaluationSpec's defaults, which validates them.
DTYPES = ("bfloat16", "float16", "float32")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="perplexity and lm-eval accuracy of a checkpoint", description=__doc__)
    parser.add_argument("--model", required=True, help="artifact://<digest>, a registered name, a checkpoint dir or .gguf")
    parser.add_argument("--ppl", type=_names, default=(), metavar="CORPORA", help="comma-separated: wikitext2,ptb or stored text datasets")
    parser.add_argument("--split", default="validation", help="perplexity split (default: validation)")
    parser.add_argument("--seq-len", type=int, help="perplexity window (default: 128)")
    parser.add_argument("--max-windows", type=int, help="perplexity on the first N windows only (default: all)")
    parser.add_argument("--tasks", type=_names, default=(), metavar="TASKS", help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, help="the first N documents of each task (default: all)")
    parser.add_argument("--num-fewshot", type=int, help="default: 0 (zero-shot)")
    parser.add_argument("--batch-size", type=int, help="default: 8")
    parser.add_argument("--seed", type=int, help="lm-eval seeds (default: 1234)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: float32")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from prunelab.cli.progress import job_progress
    from prunelab.evaluate import EvaluationSpec, run_evaluation

    defaulted = ("seq_len", "batch_size", "num_fewshot", "seed", "dtype")
    spec = EvaluationSpec(
        model=args.model,
        tasks=args.tasks,
        ppl_corpora=args.ppl,
        ppl_split=args.split,
        max_windows=args.max_windows,
        limit=args.limit,
        device=args.device,
        **{name: getattr(args, name) for name in defaulted if getattr(args, name) is not None},
    )
    with job_progress("evaluate", plain=args.json) as show:
        evaluation = run_evaluation(spec, report=lambda update: show(update.fraction, update.message))
    print(json.dumps(summary(evaluation), indent=2) if args.json else _tables(evaluation))
    return 0


def summary(evaluation: Evaluation) -> dict[str, Any]:
    """What `--json` prints: headline numbers per corpus and task, and where the full record is."""
    return {
        "model": evaluation.checkpoint.spec,
        "checkpoint_sha256": evaluation.checkpoint.sha256,
        "evaluation": evaluation.artifact.uri,
        "ppl": {item.corpus: asdict(item) for item in evaluation.perplexity},
        "tasks": {
            score.task: {name: score.metric(name) for name in _REPORTED_METRICS} | {"n": score.n} for score in evaluation.tasks
        },
        "average": asdict(evaluation.average) if evaluation.average else None,
    }


def _tables(evaluation: Evaluation) -> str:
    lines = [f"{evaluation.checkpoint.spec} (sha256 {evaluation.checkpoint.sha256[:12]})"]
    for item in evaluation.perplexity:
        lines.append(
            f"  ppl {item.corpus} ({item.split}, seq_len {item.seq_len}, {item.windows} windows): {item.ppl:.4f}"
        )
    for score in evaluation.tasks:
        cells = [f"{name} {_plus_minus(score, name)}" for name in ("acc", "acc_norm") if score.metric(name) is not None]
        lines.append(f"  {score.task}: {', '.join(cells) or 'no acc metrics'} (n={score.n})")
    if evaluation.average:
        lines.append(f"  average {evaluation.average.metric} over {', '.join(evaluation.average.tasks)}: {evaluation.average.value:.4f}")
    lines.append(f"stored {evaluation.artifact.uri}")
    return "\n".join(lines)


def _plus_minus(score: TaskScore, name: str) -> str:
    stderr = score.metric(f"{name}_stderr")
    return f"{score.metric(name):.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())
