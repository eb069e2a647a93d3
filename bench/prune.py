"""Pruning benchmark on the embedded default model (SmolLM2-135M, CPU).

For taylor (element1), l1, l2 and random at 20 %, 28.9 % and 50 % of the whole
model's parameters: ratio got, wall time, peak memory, and WikiText-2 perplexity
as LLM-Pruner computes it. Run: `.venv/bin/python -P bench/prune.py` (about 12 min
on 2 cores). Needs ../shared/data (WikiText-2 and PTB validation text).

Protocol (printed with the table):
- calibration: 10 windows x 64 tokens of PTB validation text (as the LLM-Pruner
  baseline in issue #3 was run), seed 0; the least-squares correction uses the
  same windows' activations, collected during the Taylor pass;
- perplexity: ../shared/data/wikitext2/valid.tokens, lines joined with blank lines,
  tokenized once, first 300 non-overlapping windows of 128 tokens, fp32;
- each prune runs as `prunelab prune --json` in a fresh process, so wall time is the
  whole command (load, importance, prune, save, publish to the local store) and peak
  memory is that process's RSS; "prune s" is the pruning itself (importance,
  activations, removal), the part LLM-Pruner's 38 s measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("taylor", "l1", "l2", "random")
RATIOS = (0.20, 0.289, 0.50)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--windows", type=int, default=300, help="perplexity windows of 128 tokens")
    parser.add_argument("--no-baseline-row", action="store_true", help="skip LLM-Pruner's setting (taylor, no correction, layer_ratio 0.5)")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the benchmark needs the shared validation text)")
        return 0
    home = Path(tempfile.mkdtemp(prefix="prunelab-bench-"))
    env = {**os.environ, "PRUNELAB_HOME": str(home), "PRUNELAB_OFFLINE": "true", "PRUNELAB_LOG_LEVEL": "WARNING"}
    os.environ.update(env)
    cli = [sys.executable, "-m", "prunelab.cli"]
    subprocess.run([*cli, "data", "import", "ptb", str(SHARED / "ptb" / "valid.txt"), "--split", "validation"], env=env, check=True, capture_output=True)

    from prunelab.evaluate.perplexity import perplexity
    from prunelab.models import load_model

    text = "\n\n".join((SHARED / "wikitext2" / "valid.tokens").read_text().splitlines())

    def ppl(spec: str) -> float:
        loaded = load_model(spec)
        return perplexity(loaded.model, loaded.tokenizer, text, seq_len=128, max_windows=args.windows).ppl

    rows = [["base (unpruned)", "-", "0.00 %", "-", "-", "-", f"{ppl('smollm2-135m'):.1f}"]]
    print_table(rows, header=True)
    runs = [(m, float(r), ["--semantics", "params_ratio"], m) for m in args.methods.split(",") for r in args.ratios.split(",")]
    if not args.no_baseline_row:
        # LLM-Pruner's own setting, for comparison with its published 28.9 % / ppl 170
        runs.insert(0, ("taylor", 0.5, ["--semantics", "layer_ratio", "--no-correction"], "taylor, LLM-Pruner setting (layer_ratio 0.5, no correction)"))
    for method, ratio, extra, label in runs:
        command = [*cli, "prune", "--model", "smollm2-135m", "--method", method, "--ratio", str(ratio),
                   "--attn-layers", "4:28", "--mlp-layers", "4:28", "--calibration", "ptb", "--calibration-split", "validation",
                   "--samples", "10", "--seq-len", "64", "--device", "cpu", "--json", *extra]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(f"{label} {ratio}: failed: {done.stderr[-2000:]}")
            return 1
        result = json.loads(done.stdout)
        pruning_s = sum(v for k, v in result["timings_s"].items())
        row = [label, f"{ratio:.3f}", f"{100 * result['ratio_got']:.2f} %", f"{wall:.1f}", f"{pruning_s:.1f}",
               f"{result['peak_memory_bytes'] / 2**30:.2f}", f"{ppl(result['artifact']):.1f}"]
        print_table([row])
    print(f"\ntorch threads {os.cpu_count()} cores; perplexity: WikiText-2 valid.tokens, seq_len 128, first {args.windows} windows")
    return 0


COLUMNS = ["method", "asked", "got (whole model)", "wall s", "prune s", "peak RSS GiB", "ppl wikitext2"]


def print_table(rows: list[list[str]], header: bool = False) -> None:
    if header:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
