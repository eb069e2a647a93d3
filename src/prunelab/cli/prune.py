"""`prunelab prune`: pruning in this process, the pruner service's code.

Structured removes heads and channels (--mode block, the default), hidden channels
(--mode channel) or whole decoder layers (--mode depth): --ratio is the share of
parameters to remove. With no --method, prunelab's best structured configuration
runs; naming one (taylor, l1, l2, random: LLM-Pruner's; flap, wanda-sp: FLAP's)
runs that method's recipe, and unset options take the recipe's values. Sparse
(magnitude, wanda, sparsegpt) sets weights to zero: --sparsity is the share of the
decoder's linear weights, --pattern unstructured or N:M."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Choices are spelled out here rather than imported so `prunelab --help` starts
# without torch; PruneSettings.validate() is still the authority.
METHODS = ("taylor", "l1", "l2", "random", "flap", "wanda-sp")
SPARSE_METHODS = ("magnitude", "wanda", "sparsegpt")
VARIANTS = ("element1", "element2", "mix", "vector")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prune", help="prune a model (structured, LLM-Pruner criteria; or sparse: Wanda, SparseGPT)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered name (smollm2-135m), checkpoint dir, .gguf, artifact:// URI or hub id")
    parser.add_argument("--method", default="",
                        help=f"structured: {', '.join(METHODS)}; sparse: {', '.join(SPARSE_METHODS)} "
                             f" (default flap) prunelab's best configuration with the defaults below")
    parser.add_argument("--variant", default="element1", help=f"taylor variant: {', '.join(VARIANTS)} (default element1)")
    parser.add_argument("--aggregation", default="sum", help="group aggregation: sum, mean, max, first (default sum)")
    parser.add_argument("--ratio", type=float, default=None, help="structured: share to remove, in (0, 1)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="sparse: share of the decoder's linear weights to set to zero (N:M patterns: N/M, the default)")
    parser.add_argument("--pattern", default="", help="sparse: unstructured (default) or N:M, N zeros in every M weights (2:4, 4:8)")
    parser.add_argument("--owl-lambda", type=float, default=0.08, help="sparse, --allocation owl: layer sparsity spread (default 0.08)")
    parser.add_argument("--owl-m", type=float, default=5.0, help="sparse, --allocation owl: outlier threshold, times the mean (default 5.0)")
    parser.add_argument("--semantics", default="",
                        help="structured: params_ratio, share of the whole model (default); layer_ratio: LLM-Pruner's, inside the chosen layers")
    parser.add_argument("--mode", default="block",
                        help="block: KV groups and MLP channels (default); channel: hidden size, all layers; depth: whole layers")
    parser.add_argument("--depth-criterion", default="block-influence",
                        help="mode depth: block-influence (default), angular (consecutive layers) or last")
    parser.add_argument("--allocation", default="",
                        help="structured: uniform (same amount per layer), mlp-first (MLP channels first, then KV groups; the first two layers lose at most 15 %% of their MLP), global or adaptive (ranked across layers); "
                             "sparse: uniform or owl (by outliers) (default mlp-first unless --method names a recipe)")
    parser.add_argument("--attn-layers", default=None,
                        help="START:END, end exclusive, negatives count from the end (unset: every layer, 0:, unless --method names a recipe; LLM-Pruner's is 4:-2)")
    parser.add_argument("--mlp-layers", default=None, help="as --attn-layers")
    parser.add_argument("--calibration", default="", help="registry dataset for calibration (default wikipassages unless --method names a recipe)")
    parser.add_argument("--calibration-split", default="train", help="its split (default train)")
    parser.add_argument("--samples", type=int, default=0, help="calibration windows (default 128 unless --method names a recipe)")
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per window (default 128 unless --method names a recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--correction", default="",
                        help="how o_proj/down_proj make up for lost inputs: refit (least squares), bias (FLAP's) or none "
                             "(default refit unless --method names a recipe)")
    parser.add_argument("--no-correction", dest="correction", action="store_const", const="none", help="as --correction none")
    parser.add_argument("--correction-samples", type=int, default=0, help="windows the refit sees (default 128 unless --method names a recipe)")
    parser.add_argument("--correction-seq-len", type=int, default=0, help="tokens per refit window (default 128 unless --method names a recipe)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default PRUNELAB_DEVICE, else auto)")
    parser.add_argument("--out", type=Path, default=None, help="also write the checkpoint to this new directory")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    parser.set_defaults(handler=_prune)


def _prune(args: argparse.Namespace) -> int:
    from prunelab.cli.progress import job_progress
    from prunelab.config import settings
    from prunelab.prune import PruneSettings, run_prune

    prune_settings = PruneSettings(
        ratio=_ratio(args), method=args.method, variant=args.variant, aggregation=args.aggregation,
        semantics=args.semantics, mode=args.mode, allocation=args.allocation, attn_layers=args.attn_layers,
        mlp_layers=args.mlp_layers, calibration=args.calibration, samples=args.samples, seq_len=args.seq_len,
        seed=args.seed, correction=args.correction, pattern=args.pattern, owl_lambda=args.owl_lambda, owl_m=args.owl_m,
        correction_samples=args.correction_samples, correction_seq_len=args.correction_seq_len,
        depth_criterion=args.depth_criterion,
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
        if r.sparsity:
            print(f"set {r.ratio_got:.2%} of the decoder's linear weights to zero ({r.sparsity['pattern']}, asked {r.ratio_asked:.2%}); "
                  f"nonzero parameters {r.params_before:,} -> {r.nonzero_params:,}, dense size unchanged")
        else:
            print(f"removed {r.ratio_got:.2%} of parameters ({r.params_before:,} -> {r.params_after:,}; asked {r.ratio_asked:.2%}, {r.semantics})")
        print(f"peak memory {outcome.peak_memory_bytes / 2**30:.2f} GiB ({outcome.memory_kind}), {outcome.wall_seconds:.1f} s")
        print(f"artifact {outcome.artifact.uri}" + (f"\ncheckpoint {outcome.checkpoint_dir}" if outcome.checkpoint_dir else ""))
    return 0


def _ratio(args: argparse.Namespace) -> float:
    """--ratio for structured methods, --sparsity (or an N:M pattern's N/M) for sparse ones."""
    from prunelab.errors import InvalidArgument
    from prunelab.prune.sparse import Pattern

    sparse = args.method in SPARSE_METHODS
    if sparse and args.ratio is not None:
        raise InvalidArgument(f"{args.method} sets weights to zero: give --sparsity (the share of the decoder's linear weights), not --ratio")
    if not sparse and args.sparsity is not None:
        raise InvalidArgument(f"{args.method} removes heads and channels: give --ratio, not --sparsity (sparse methods: {', '.join(SPARSE_METHODS)})")
    given = args.sparsity if sparse else args.ratio
    pattern = Pattern.parse(args.pattern) if sparse else None
    if given is None and pattern is not None and not pattern.unstructured:
        return pattern.sparsity
    if given is None:
        raise InvalidArgument("give --sparsity" if sparse else "give --ratio")
    return given
