"""`prunelab export`: a model (registered name, checkpoint directory, artifact:// URI,
hub id) as one GGUF file that llama.cpp, Ollama and LM Studio load, published to the
store as a "gguf" artifact; `--out` also writes the file. Uniform, per-layer-width,
depth-pruned and sparse Llama/Mistral checkpoints; f16 or q8_0 weights. Pruned
feed-forward widths are padded with zero channels to whole 32-value blocks, which
changes no output and lets them quantize and take llama.cpp's fast kernels."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUTTYPES = ("f16", "q8_0")  # spelled out so `prunelab --help` starts without gguf; OUTTYPES in prunelab.export rules


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write a model as GGUF for llama.cpp / Ollama",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered name, checkpoint dir, artifact:// URI or hub id")
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES, help="weight type (default f16)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.gguf", help="also write the GGUF file here (must not exist)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from prunelab.cli.progress import job_progress
    from prunelab.export import FFN_BLOCK, run_export

    with job_progress("export", silent=args.json) as show:
        outcome = run_export(args.model, args.outtype, out_file=args.out,
                             progress=lambda phase, fraction, message: show(fraction, f"{phase}: {message}"))
    if args.json:
        print(json.dumps(outcome.as_dict()))
    else:
        f = outcome.file
        print(f"{f.architecture} GGUF, {f.outtype}, {f.tensors} tensors, {f.size_bytes / 2**20:.1f} MiB in {outcome.wall_seconds:.1f} s")
        if f.padded_channels:
            print(f"feed-forward widths padded to blocks of {FFN_BLOCK} with {f.padded_channels} zero channels (outputs unchanged)")
        print(f"artifact {outcome.artifact.uri}" + (f"\nfile {args.out}" if args.out else ""))
    return 0
