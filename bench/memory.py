"""Memory benchmark: a structured prune of a TinyLlama-1.1B-shaped model on CPU, its
peak RSS against the model's own bytes (issue 14's target: at most 1.5x).

The model is randomly initialised (no download): LlamaForCausalLM with 22 layers,
hidden 2048, 32 query / 4 KV heads, MLP 5632, vocabulary 32000, float32, untied
head, about 4.4 GB. Run: `.venv/bin/python -P bench/memory.py` (about 19 min on 2
cores, 12 GB of free disk; `--layers 12` for a quick check of the pipeline). Needs
../shared/data (PTB validation text, the calibration corpus). Measured 2026-11-30 on
2 cores: 4.40 GB model, 6.05 GB peak RSS, 1.37x, 1094 s (importance 79 s, removal
with the layer-by-layer refit 984 s); again after the refit's ridge search moved to
one eigendecomposition per fold, on cores shared with three other jobs: 6.08 GB,
1.38x, 1997 s.

Protocol (printed with the figures):
- the checkpoint is written once by a separate process (safetensors) with a
  byte-level BPE tokenizer trained on the calibration text itself (32000 tokens at
  most, so every id fits the vocabulary; its quality is irrelevant here), and this
  process holds no weights while the prune runs;
- the prune is `prunelab prune --model DIR --method taylor --ratio 0.2 --device cpu
  --json --calibration ptb --calibration-split validation` in a fresh process:
  LLM-Pruner's recipe (10 x 64 tokens, layers 4:-2) with the least-squares
  correction, the whole command (load, importance, removal, correction, save,
  publish to the local store);
- peak RSS is the kernel's high-water mark of that process (VmHWM, through wait4's
  ru_maxrss), the model's bytes are its parameters' as stored (the safetensors
  headers), and the ratio is the one the issue asks about.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # last: bench/profile.py would shadow the stdlib
from prune import GIB, SHARED, run_measured  # noqa: E402

# TinyLlama-1.1B's shape (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json)
TINYLLAMA_SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGET = 1.5  # peak RSS / model bytes, issue 14


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="taylor")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--layers", type=int, default=TINYLLAMA_SHAPE["num_hidden_layers"],
                        help="decoder layers (default 22, TinyLlama's; 12 for a quick check: the recipe prunes only layers 4:-2)")
    parser.add_argument("--keep", action="store_true", help="keep the bench's directory (model, store) for inspection")
    args = parser.parse_args()
    calibration_text = SHARED / "ptb" / "valid.txt"
    if not calibration_text.is_file():
        print(f"skipped: {calibration_text} is absent (the benchmark calibrates on the shared PTB validation text)")
        return 0
    home = Path(tempfile.mkdtemp(prefix="prunelab-bench-memory-"))
    try:
        return run(args, home, calibration_text)
    finally:
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def run(args: argparse.Namespace, home: Path, calibration_text: Path) -> int:
    env = {**os.environ, "PRUNELAB_HOME": str(home), "PRUNELAB_OFFLINE": "true", "PRUNELAB_LOG_LEVEL": "WARNING"}
    cli = [sys.executable, "-m", "prunelab.cli"]
    subprocess.run([*cli, "data", "import", "ptb", str(calibration_text), "--split", "validation"], env=env, check=True,
                   capture_output=True)
    model_dir = home / "tinyllama-shaped"
    # a separate process builds and saves the model, so none of its memory stays in this one
    builder = multiprocessing.get_context("spawn").Process(target=build_checkpoint,
                                                           args=(model_dir, args.layers, calibration_text))
    builder.start()
    builder.join()
    if builder.exitcode != 0:
        print(f"building the model failed (exit code {builder.exitcode})")
        return 1
    model_bytes = stored_parameter_bytes(model_dir)
    command = [*cli, "prune", "--model", str(model_dir), "--method", args.method, "--ratio", str(args.ratio),
               "--device", "cpu", "--json", "--calibration", "ptb", "--calibration-split", "validation"]
    done, wall, peak_bytes = run_measured(command, env)
    if done.returncode != 0:
        print(f"prune failed: {done.stderr[-3000:]}")
        return 1
    result = json.loads(done.stdout)
    ratio = peak_bytes / model_bytes
    print(f"model: TinyLlama-1.1B-shaped LlamaForCausalLM, {args.layers} layers, random weights, float32")
    print(f"prune: {' '.join(command[3:])}")
    print(f"| model bytes | peak RSS (VmHWM) | peak / model (target <= {TARGET}) | wall s | removed (whole model) |")
    print("|---|---|---|---|---|")
    print(f"| {model_bytes / 1e9:.2f} GB ({model_bytes / GIB:.2f} GiB) | {peak_bytes / 1e9:.2f} GB "
          f"({peak_bytes / GIB:.2f} GiB) | {ratio:.2f}x | {wall:.1f} | {100 * result['ratio_got']:.2f} % |")
    print(f"phases (s): {json.dumps(result['timings_s'])}; the prune's own sampled peak "
          f"({result['memory_kind']}): {result['peak_memory_bytes'] / 1e9:.2f} GB")
    print(f"{'meets' if ratio <= TARGET else 'misses'} the target of {TARGET}x")
    return 0


def build_checkpoint(directory: Path, layers: int, tokenizer_text: Path) -> None:
    """Save a randomly initialised TinyLlama-shaped model and a tokenizer whose ids
    fit its vocabulary into `directory`."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging

    logging.disable_progress_bar()
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(tokenizer_text)], vocab_size=TINYLLAMA_SHAPE["vocab_size"], show_progress=False,
              special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINYLLAMA_SHAPE, "num_hidden_layers": layers}, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def stored_parameter_bytes(directory: Path) -> int:
    """Bytes of every tensor in the directory's safetensors files, read from their
    headers (8 bytes of header length, then a JSON index of data offsets)."""
    total = 0
    for path in directory.glob("*.safetensors"):
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        total += sum(end - start for name, entry in header.items() if name != "__metadata__"
                     for start, end in [entry["data_offsets"]])
    return total


if __name__ == "__main__":
    sys.exit(main())
