"""How mlp-first spares the ends of the stack: its settings chosen on text that reports nothing.

prunelab's best configuration (no --method) removes MLP channels (and, past 3/4 of
each MLP, KV groups) in equal numbers from every layer, except that the first
SPARED_FIRST and last SPARED_LAST layers lose at most SPARED_MLP_SHARE of their MLP
channels (prune/pruner.py). This benchmark prunes SmolLM2-135M with each candidate
setting and scores it on a *dev* text, so that the choice never sees the texts the
pruner's figures are reported on.

Run: `.venv/bin/python -P bench/spare.py [--ratio 0.5] [--candidates 2:0:0.25,2:1:0.5]`
(FIRST:LAST:SHARE each; about 4 min per candidate on 2 cores). Needs ../shared/data.

Protocol (printed with the table):
- model: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32);
- text: raw `wikipassages` train, cut by rows: rows i % 5 == 4 are the dev text, the
  others the calibration text (the best configuration's recipe, 128 x 128 tokens at
  seeded offsets, drawn from them only); the validation split is not read;
- dev perplexity: the first 128 non-overlapping windows of 128 tokens of the dev rows
  joined as the evaluator joins rows, fp32; the lowest wins.
The shipped setting is then reported on raw `wikipassages` validation by bench/prune.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEV_EVERY = 5  # row i is dev when i % DEV_EVERY == DEV_EVERY - 1
DEV_WINDOWS = 128
SEQ_LEN = 128


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5, help="share of the whole model removed")
    parser.add_argument("--candidates", default="0:0:1,2:1:0.5,2:0:0.5,2:0:0.35,2:0:0.25,2:0:0.15,1:0:0.25,3:0:0.25",
                        help="FIRST:LAST:SHARE, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (the benchmark needs the shared wikipassages text)")
        return 0
    os.environ.update(PRUNELAB_HOME=tempfile.mkdtemp(prefix="prunelab-bench-spare-"), PRUNELAB_OFFLINE="true",
                      PRUNELAB_LOG_LEVEL="WARNING")
    import torch

    torch.set_num_threads(args.threads)
    calibration, dev = split_rows((SHARED / "wikipassages" / "train.txt").read_text(encoding="utf-8").splitlines())
    print(f"ratio {args.ratio}; dev: {DEV_WINDOWS} windows of {SEQ_LEN} tokens of wikipassages train rows i % {DEV_EVERY} == "
          f"{DEV_EVERY - 1}; calibration: the other rows\n\n| first | last | share | removed | dev ppl | prune s |\n|---|---|---|---|---|---|")
    for candidate in args.candidates.split(","):
        first, last, share = candidate.split(":")
        row = prune_and_score(int(first), int(last), float(share), args.ratio, calibration, dev)
        print(f"| {first} | {last} | {share} | {row['removed']:.2%} | {row['dev_ppl']:.2f} | {row['seconds']:.0f} |", flush=True)
    return 0


def split_rows(rows: list[str]) -> tuple[str, str]:
    """(calibration text, dev text): the dev rows joined as the evaluator joins rows."""
    from prunelab.evaluate.perplexity import ROW_JOINER

    dev = [row for i, row in enumerate(rows) if i % DEV_EVERY == DEV_EVERY - 1]
    return "\n".join(row for i, row in enumerate(rows) if i % DEV_EVERY != DEV_EVERY - 1), ROW_JOINER.join(dev)


def prune_and_score(first: int, last: int, share: float, ratio: float, calibration: str, dev: str) -> dict:
    """The best configuration with these sparing settings, pruned and scored on `dev`.
    The settings are module constants (part of the best configuration, not a user
    setting), so the benchmark sets them for the run."""
    import prunelab.prune.pruner as pruner
    from prunelab.evaluate.perplexity import perplexity
    from prunelab.models import LlamaFamilyAdapter, load_model
    from prunelab.prune import PruneSettings

    pruner.SPARED_FIRST, pruner.SPARED_LAST, pruner.SPARED_MLP_SHARE = first, last, share
    started = time.perf_counter()
    loaded = load_model("smollm2-135m")
    before = LlamaFamilyAdapter(loaded.model).num_parameters()
    pruner.prune_model(loaded.model, loaded.tokenizer, PruneSettings(ratio=ratio), calibration)
    seconds = time.perf_counter() - started
    removed = 1 - LlamaFamilyAdapter(loaded.model).num_parameters() / before
    ppl = perplexity(loaded.model, loaded.tokenizer, dev, seq_len=SEQ_LEN, max_windows=DEV_WINDOWS).ppl
    return {"removed": removed, "dev_ppl": ppl, "seconds": seconds}


if __name__ == "__main__":
    sys.exit(main())
