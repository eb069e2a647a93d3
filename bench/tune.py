"""LoRA recovery benchmark: SmolLM2-135M pruned 50 % with taylor, then `run_tune` on CPU.

Run: `python -P bench/tune.py` (pruning ~2 min, tuning ~8-10 min on 2 busy cores;
the smallest run: `--steps 2 --eval-every 1 --max-val-examples 4`). Needs
../shared/data (WikiText-2 validation text); prints a message and exits 0 without it.
The model, SmolLM2-135M-Instruct, is the Q4_1 GGUF dequantized to float32, so its
perplexities are not the original checkpoint's.

Protocol (printed with the results):
- text: ../shared/data/wikitext2/valid.tokens cut by lines: the first 90 % of lines
  are split `train` of dataset `wikitext2-valid`, the last 10 % its `validation`
  split (contiguous, so the validation text is neither calibrated nor trained on),
  imported with `import_dataset` into a temporary PRUNELAB_HOME;
- prune: `run_prune("smollm2-135m", PruneSettings(ratio=0.5, method="taylor",
  attn_layers="4:28", mlp_layers="4:28", calibration="wikitext2-valid"))` on the
  train split (pruner defaults otherwise: 10 windows x 64 tokens, least-squares
  correction on);
- tune: `run_tune(pruned, TuneSettings(data="wikitext2-valid", val_data=
  "wikitext2-valid", ...))` with the hyperparameters below, fp32, one torch thread
  (on a shared 2-core machine two OpenMP threads spin-wait: a step took 6x longer);
- perplexity: exp(mean NLL) over windows of max_length tokens of the validation
  split, which the tuner cuts in two: the *selection* half (the first half of its
  windows, at most max_val_examples) chooses the step returned, so its "after" is
  biased low by construction (never above "before"); the *held-out* half (the last
  half, at most max_val_examples) is scored only on the input and the returned
  model. The goal is judged on the held-out figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASET = "wikitext2-valid"
TRAIN_SHARE = 0.9  # of valid.tokens' lines; the rest is validation
GOAL = 0.20  # held-out perplexity at least this much lower


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--max-val-examples", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the benchmark needs the shared WikiText-2 validation text)")
        return 0
    home = Path(tempfile.mkdtemp(prefix="prunelab-bench-tune-"))
    os.environ.update(PRUNELAB_HOME=str(home), PRUNELAB_OFFLINE="true", PRUNELAB_LOG_LEVEL="WARNING")
    try:
        return run(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(args: argparse.Namespace, home: Path) -> int:
    import torch

    from prunelab.prune import PruneSettings, run_prune
    from prunelab.tune import TuneSettings, run_tune

    torch.set_num_threads(args.threads)
    import_split_text(home / "parts")
    started = time.perf_counter()
    pruned = run_prune(
        "smollm2-135m",
        PruneSettings(ratio=0.5, method="taylor", attn_layers="4:28", mlp_layers="4:28", calibration=DATASET),
        calibration_split="train",
    )
    print(f"pruned {pruned.report.ratio_got:.2%} of parameters in {time.perf_counter() - started:.0f} s -> {pruned.artifact.uri}")
    settings = TuneSettings(
        data=DATASET, val_data=DATASET, steps=args.steps, lr=args.lr, rank=args.rank, max_length=args.max_length,
        batch_size=args.batch_size, eval_every=args.eval_every, max_val_examples=args.max_val_examples,
    )
    print(f"tuning: {settings.as_dict()}", flush=True)
    outcome = run_tune(pruned.artifact.uri, settings, device="cpu", progress=print_evaluations)
    print_results(outcome)
    return 0


def import_split_text(folder: Path) -> None:
    from prunelab.data import import_dataset

    lines = (SHARED / "wikitext2" / "valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * TRAIN_SHARE)
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("".join(lines[:cut]), encoding="utf-8")
    (folder / "valid.txt").write_text("".join(lines[cut:]), encoding="utf-8")
    import_dataset(DATASET, folder)
    print(f"{DATASET}: train = lines 1-{cut} of valid.tokens, validation = lines {cut + 1}-{len(lines)}")


def print_evaluations(update) -> None:
    if update.training is not None and update.training.val_ppl is not None:
        print(f"  {update.message}", flush=True)


def print_results(outcome) -> None:
    print(f"\n{'step':>6} {'train loss':>11} {'selection ppl':>14}")
    for point in outcome.curve:
        loss = f"{point.train_loss:.4f}" if point.train_loss is not None else "-"
        print(f"{point.step:>6} {loss:>11} {point.val_ppl:>14.2f}")
    data = outcome.data
    heldout = outcome.heldout_ppl_after / outcome.heldout_ppl_before - 1
    selection = outcome.val_ppl_after / outcome.val_ppl_before - 1
    print("\n| split | windows | ppl before | ppl after | change |\n|---|---|---|---|---|")
    print(f"| held-out (chose nothing) | {data['heldout_examples']} | {outcome.heldout_ppl_before:.2f} | "
          f"{outcome.heldout_ppl_after:.2f} | {heldout:+.1%} |")
    print(f"| selection (chose the step; biased) | {data['val_examples']} | {outcome.val_ppl_before:.2f} | "
          f"{outcome.val_ppl_after:.2f} | {selection:+.1%} |")
    print(f"{outcome.reason}")
    print(f"tuning wall time {outcome.wall_seconds:.0f} s, peak RSS {outcome.peak_memory_bytes / 2**30:.2f} GiB (sampled)")
    print(f"goal (held-out perplexity at least {GOAL:.0%} lower): {'met' if heldout <= -GOAL else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
