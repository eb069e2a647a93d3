"""Evaluator figures on SmolLM2-135M: perplexity on the shared validation text, seconds
per 100 documents of each task fixture, and the evaluator's overhead over calling
`lm_eval.simple_evaluate` directly on the same model and data.

    python bench/evaluate.py [--seq-lens 128,2048] [--max-windows 300] [--batch-size 4]
                             [--repeats 3] [--skip-ppl] [--skip-tasks]

Perplexity: ../shared/data/wikitext2/valid.tokens and ../shared/data/ptb/valid.txt
(skipped, with a message, where absent), LLM-Pruner's windowing, the first
--max-windows windows. Tasks: tests/fixtures/tasks/*.jsonl, imported as the datasets
named like their tasks into a scratch store. Overhead: `run_evaluation` (load, tasks,
scores, store) against load + the same lm-eval Task objects + plain HFLM +
`simple_evaluate`, after one warm-up, alternating, best of --repeats; lm-eval's task
index is built once beforehand for both.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
CORPUS_FILES = {"wikitext2": SHARED_DATA / "wikitext2" / "valid.tokens", "ptb": SHARED_DATA / "ptb" / "valid.txt"}
TASK_FIXTURES = REPO / "tests" / "fixtures" / "tasks"
MODEL = "smollm2-135m"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="128,2048", help="comma-separated perplexity window lengths")
    parser.add_argument("--max-windows", type=int, default=300, help="perplexity windows per corpus and length")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--skip-tasks", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="task runs of each side, alternating; the best counts")
    args = parser.parse_args()
    # A scratch store keeps fixtures and evaluations out of the user's; the model cache stays shared.
    os.environ["PRUNELAB_STORE"] = tempfile.mkdtemp(prefix="prunelab-bench-store-")
    os.environ.setdefault("PRUNELAB_DATA_DIR", str(SHARED_DATA))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not args.skip_ppl:
        bench_perplexity([int(n) for n in args.seq_lens.split(",")], args.max_windows, args.batch_size)
    if not args.skip_tasks:
        bench_tasks(args.batch_size, args.repeats)
    return 0


def bench_perplexity(seq_lens: list[int], max_windows: int, batch_size: int) -> None:
    from prunelab.evaluate import EvaluationSpec, run_evaluation

    corpora = [name for name, path in CORPUS_FILES.items() if path.is_file()]
    for name, path in CORPUS_FILES.items():
        if not path.is_file():
            print(f"skipping {name}: {path} is absent (it exists on developer machines and in CI only)")
    if not corpora:
        return
    print(f"\nperplexity: {MODEL}, float32, first {max_windows} windows, batch {batch_size}")
    print(f"{'corpus':10} {'seq_len':>7} {'windows':>7} {'tokens':>8} {'ppl':>9} {'seconds':>8}  text sha256")
    for seq_len in seq_lens:
        for corpus in corpora:
            started = time.perf_counter()
            spec = EvaluationSpec(model=MODEL, ppl_corpora=(corpus,), seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
            [result] = run_evaluation(spec).perplexity
            seconds = time.perf_counter() - started
            print(
                f"{corpus:10} {seq_len:7d} {result.windows:7d} {result.tokens:8d} {result.ppl:9.3f} {seconds:8.1f}  "
                f"{result.dataset_sha256[:12]}",
                flush=True,
            )


def bench_tasks(batch_size: int, repeats: int) -> None:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from prunelab.data import import_dataset
    from prunelab.evaluate import EvaluationSpec, run_evaluation
    from prunelab.evaluate.tasks import prepare_tasks, task_manager
    from prunelab.models import load_model

    fixtures = sorted(TASK_FIXTURES.glob("*.jsonl"))
    tasks = tuple(path.name.split(".")[0] for path in fixtures)
    for path in fixtures:
        import_dataset(path.name.split(".")[0], path)
    task_manager()  # lm-eval's index, once, outside both timings
    # One thread: on a shared machine, idle-spinning thread pools make timings swing by 3x.
    torch.set_num_threads(1)

    def evaluator() -> tuple[object, dict[str, list[float]]]:
        stamps: dict[str, list[float]] = {}
        spec = EvaluationSpec(model=MODEL, tasks=tasks, batch_size=batch_size)
        evaluation = run_evaluation(spec, report=lambda update: stamps.setdefault(update.phase, []).append(time.perf_counter()))
        return evaluation, stamps

    def direct() -> dict:
        loaded = load_model(MODEL)
        prepared = prepare_tasks(tasks, num_fewshot=0)
        return lm_eval.simple_evaluate(
            model=HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size),
            tasks=[task for item in prepared for task in item.built],
            num_fewshot=0,
            task_manager=task_manager(),
            log_samples=False,
        )

    direct()  # warm-up: kernels, the json datasets' Arrow cache
    runs: dict[str, list[tuple[float, float, object]]] = {"evaluator": [], "direct": []}
    for _ in range(repeats):
        for name, job in (("evaluator", evaluator), ("direct", direct)):
            wall, cpu = time.perf_counter(), time.process_time()
            outcome = job()
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu, outcome))
    ours, theirs = min(runs["evaluator"], key=_wall), min(runs["direct"], key=_wall)
    (evaluation, stamps), reference = ours[2], theirs[2]

    print(f"\ntasks: {MODEL}, float32, 1 thread, batch {batch_size}, zero-shot, fixtures of tests/fixtures/tasks")
    print(f"{'task':14} {'docs':>4} {'seconds':>8} {'s/100 docs':>10} {'acc':>6} {'acc_norm':>8} {'acc = direct':>12}")
    for score in evaluation.tasks:
        times = stamps[f"task:{score.task}"]
        seconds = times[-1] - times[0]
        acc_norm = score.metric("acc_norm")
        same = score.metrics["acc,none"] == reference["results"][score.task]["acc,none"]
        print(
            f"{score.task:14} {score.n:4d} {seconds:8.2f} {seconds / score.n * 100:10.1f} {score.metric('acc'):6.3f} "
            f"{'-' if acc_norm is None else f'{acc_norm:.3f}':>8} {str(same):>12}"
        )
    if evaluation.average:
        print(f"average {evaluation.average.metric} over {', '.join(evaluation.average.tasks)}: {evaluation.average.value:.3f}")
    print(
        f"\noverhead, best of {repeats}: evaluator (load, {len(tasks)} tasks, scores, store) {ours[0]:.1f} s wall, "
        f"{ours[1]:.1f} s CPU; load + simple_evaluate {theirs[0]:.1f} s wall, {theirs[1]:.1f} s CPU: "
        f"{ours[0] / theirs[0]:.3f}x wall, {ours[1] / theirs[1]:.3f}x CPU (goal <= 1.1x)"
    )


def _wall(run: tuple[float, float, object]) -> float:
    return run[0]


if __name__ == "__main__":
    sys.exit(main())
