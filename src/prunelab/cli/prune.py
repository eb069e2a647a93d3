"""`prunelab prune`: structured pruning in this process, the pruner service's code."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Choices are spelled out here rather than imported so `prunelab --help` starts
# without torch; PruneSettings.validate() is still the authority.
METHODS = ("taylor", "l1", "l2", "random")
VARIANTS = ("element1", "element2", "mix", "vector")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prune", help="prune a model (structured, LLM-Pruner criteria)", description=__doc__)
    parser.add_argument("--model", required=True, help="registered name (smollm2-135m), checkpoint dir, .gguf, artifact:// URI or hub id")
    parser.add_argument("--method", default="taylor", help=f"importance: {', '.join(METHODS)} (default taylor)")
    parser.add_argument("--variant", default="element1", help=f"taylor variant: {', '.join(VARIANTS)} (default element1)")
    parser.add_argument("--aggregation", default="sum", help="group aggregation: sum, mean, max, first (default sum)")
    parser.add_argument("--ratio", type=float, required=True, help="share to remove, in (0, 1)")
    parser.add_argument("--semantics", default="params_ratio",
                        help="params_ratio: share of the whole model (default); layer_ratio: LLM-Pruner's, inside the chosen layers")
    parser.add_argument("--mode", default="block", help="block: KV groups and MLP channels (default); channel: hidden size, all layers")
    parser.add_argument("--allocation", default="uniform", help="uniform: same amount per allowed layer (default); global: ranked across layers")
    parser.add_argument("--attn-layers", default="4:-2", help="START:END, end exclusive, negatives count from the end (default 4:-2)")
    parser.add_argument("--mlp-layers", default="4:-2", help="as --attn-layers")
    parser.add_argument("--calibration", default="wikitext2", help="registry dataset for calibration (default wikitext2)")
    parser.add_argument("--calibration-split", default="train", help="its split (default train)")
    parser.add_argument("--samples", type=int, default=10, help="calibration windows (default 10)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per window (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-correction", dest="correction", action="store_false",
                        help="skip the least-squares refit of o_proj/down_proj (pure LLM-Pruner)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default PRUNELAB_DEVICE, else auto)")
    parser.add_argument("--out", type=Path, default=None, help="also write the checkpoint to this new directory")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    parser.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    from prunelab.cli.progress import job_progress
    from prunelab.config import settings
    from prunelab.prune import PruneSettings, run_prune

    prune_settings = PruneSettings(
        ratio=args.ratio, method=args.method, variant=args.variant, aggregation=args.aggregation,
        semantics=args.semantics, mode=args.mode, allocation=args.allocation, attn_layers=args.attn_layers,
        mlp_layers=args.mlp_layers, calibration=args.calibration, samples=args.samples, seq_len=args.seq_len,
        seed=args.seed, correction=args.correction,
    )
    with job_progress("prune", silent=args.json) as show:
        outcome = run_prune(
            args.model, prune_settings, device=args.device or settings().torch_device(),
            calibration_split=args.calibration_split, out_dir=args.out,
            progress=lambda phase, fraction, message: show(fraction, f"{phase}: {message}"),
        )
    if args.json:
        print(json.dumps(outcome.as_dict()))
    else:
        r = outcome.report
        print(f"removed {r.ratio_got:.2%} of parameters ({r.params_before:,} -> {r.params_after:,}; asked {r.ratio_asked:.2%}, {r.semantics})")
        print(f"peak memory {outcome.peak_memory_bytes / 2**30:.2f} GiB ({outcome.memory_kind}), {outcome.wall_seconds:.1f} s")
        print(f"artifact {outcome.artifact.uri}" + (f"\ncheckpoint {outcome.checkpoint_dir}" if outcome.checkpoint_dir else ""))
    return 0
