"""`prunelab evaluate --model M [--ppl wikitext2,ptb] [--tasks boolq,...]`: the
Evaluator service's job, run in this process (progress on stderr, results on stdout,
the evaluation stored like the service stores it)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from prunelab.evaluate import Evaluation, EvaluationSpec, ProgressUpdate, run_evaluation
from prunelab.evaluate.evaluation import DTYPES
from prunelab.evaluate.perplexity import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from prunelab.evaluate.tasks import DEFAULT_SEED, TaskScore

_REPORTED_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="perplexity and lm-eval accuracy of a checkpoint", description=__doc__)
    parser.add_argument("--model", required=True, help="artifact://<digest>, a registered name, a checkpoint dir or .gguf")
    parser.add_argument("--ppl", type=_names, default=(), metavar="CORPORA", help="comma-separated: wikitext2,ptb or stored text datasets")
    parser.add_argument("--split", default="validation", help="perplexity split (default: validation)")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"perplexity window (default: {DEFAULT_SEQ_LEN})")
    parser.add_argument("--max-windows", type=int, help="perplexity on the first N windows only (default: all)")
    parser.add_argument("--tasks", type=_names, default=(), metavar="TASKS", help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, help="the first N documents of each task (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="default: 0 (zero-shot)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"default: {DEFAULT_BATCH_SIZE}")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"lm-eval seeds (default: {DEFAULT_SEED})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    spec = EvaluationSpec(
        model=args.model,
        tasks=args.tasks,
        ppl_corpora=args.ppl,
        ppl_split=args.split,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
    )
    evaluation = run_evaluation(spec, report=_print_progress)
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


def _print_progress(update: ProgressUpdate) -> None:
    print(f"[{update.fraction:4.0%}] {update.message}", file=sys.stderr, flush=True)


def _names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())
