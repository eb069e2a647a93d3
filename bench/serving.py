"""Serving benchmark: SmolLM2-135M and three 20 %-pruned copies (uniform widths,
the best configuration's per-layer widths, and depth), each exported to GGUF and
timed in llama.cpp against the exported base, and in PyTorch against the base.

    python -P bench/serving.py [--repeats 5] [--seq-len 128] [--gen-tokens 32] [--threads 2] [--gguf-type f16]

Prints one row per model: parameters, GGUF sizes (f16 and q8_0), llama.cpp prefill
ms and decode tok/s at batch 1, and the speed-ups over the base model in llama.cpp
and in PyTorch (each engine's model and base timed alternately in one process:
medians of per-round ratios). Needs llama-cpp-python (`make test-slow` installs it,
or pip install 'prunelab[llama]'). The pruning is prunelab's best configuration (calibration
and refit on wikipassages train); tests/test_llama_cpp.py checks the exports'
agreement with transformers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from prunelab.export import write_gguf
from prunelab.models import resolve_model
from prunelab.profile import ProfileOptions, profile_models
from prunelab.prune import PruneSettings, run_prune

BASE = "smollm2-135m"
PRUNED = {
    "uniform 20%": PruneSettings(ratio=0.2, allocation="uniform", attn_layers="0:", mlp_layers="0:"),
    "per-layer 20%": PruneSettings(ratio=0.2),  # prunelab's best configuration: MLP first, widths differ per layer
    "depth 20%": PruneSettings(ratio=0.2, mode="depth"),  # block influence on the calibration text
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gguf-type", default="f16", choices=("f16", "q8_0"))
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    specs = {"base": BASE, **{name: str(run_prune(BASE, settings, out_dir=folder / str(index)).checkpoint_dir)
                              for index, (name, settings) in enumerate(PRUNED.items())}}
    common = dict(seq_len=args.seq_len, gen_tokens=args.gen_tokens, repeats=args.repeats, threads=args.threads,
                  measure_memory=False, batch_sizes=(1,))
    print(f"SmolLM2-135M, CPU, {args.threads} threads, batch 1, prompt {args.seq_len} tokens, {args.gen_tokens} decode steps, "
          f"{args.repeats} timed rounds; llama.cpp on {args.gguf_type} exports\n")
    print("| model | params | GGUF f16 MiB | GGUF q8_0 MiB | arch | llama.cpp prefill ms | llama.cpp decode tok/s "
          "| llama.cpp speed-up prefill / decode | PyTorch speed-up prefill / decode |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, spec in specs.items():
        sizes, arch = _gguf_sizes(spec, folder / f"{name.split()[0]}")
        baseline = None if name == "base" else BASE
        torch_run = profile_models([spec], baseline=baseline, options=ProfileOptions(**common))
        llama_run = profile_models([spec], baseline=baseline, options=ProfileOptions(**common, engine="llama.cpp", gguf_type=args.gguf_type))
        own = llama_run.models[0].latency[0]
        print(f"| {name} | {torch_run.models[0].params.total / 1e6:.1f} M | {sizes['f16']:.1f} | {sizes['q8_0']:.1f} | {arch} "
              f"| {own.prefill_ms.median:.1f} | {own.decode_tokens_per_s.median:.1f} "
              f"| {_speedups(llama_run)} | {_speedups(torch_run)} |", flush=True)


def _gguf_sizes(spec: str, folder: Path) -> tuple[dict[str, float], str]:
    folder.mkdir(parents=True, exist_ok=True)
    sizes, arch = {}, ""
    for outtype in ("f16", "q8_0"):
        written = write_gguf(resolve_model(spec).path, folder / f"{outtype}.gguf", outtype)
        sizes[outtype], arch = written.size_bytes / 2**20, written.architecture
        written.path.unlink()
    return sizes, arch


def _speedups(report) -> str:
    speedup = report.models[0].latency[0].speedup
    return "1.00x / 1.00x" if speedup is None else f"{speedup.prefill.median:.2f}x / {speedup.decode.median:.2f}x"


if __name__ == "__main__":
    main()
