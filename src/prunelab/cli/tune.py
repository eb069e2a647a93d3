"""`prunelab tune`: recovery of a (pruned) checkpoint in this process, the tuner
service's code: LoRA or every parameter (--full), on next-token loss or by
distillation from the model it was pruned from (--objective kd / kd+ce). Under
torchrun (`torchrun --nproc-per-node N -m prunelab.cli tune ...`) it trains
data-parallel over the N processes, one GPU each with --device cuda (gloo on CPUs),
with the same global batch as one process. The result is never worse on validation than the input: the best
evaluated step wins, step 0 (the input) included. Running the same command again
after an interruption resumes from its last evaluation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Options left unset take TuneSettings' defaults (not repeated here, so `prunelab
# --help` starts without importing torch). dest -> (type, help).
_SETTINGS_OPTIONS: dict[str, tuple[type, str]] = {
    "data_split": (str, "split of --data to train on (default train)"),
    "val_data": (str, "dataset to validate on (default: hold out the last --val-fraction of --data)"),
    "val_split": (str, "split of --val-data (default validation)"),
    "val_fraction": (float, "share of --data held out for validation, from its end (default 0.1)"),
    "heldout_fraction": (float, "share of the validation examples never used to choose the step (default 0.5)"),
    "max_val_examples": (int, "validation examples scored per evaluation (default 64)"),
    "steps": (int, "optimizer steps (default: --epochs passes over the data)"),
    "epochs": (float, "passes over the training examples when --steps is not given (default 1)"),
    "lr": (float, "peak learning rate (default 1e-4)"),
    "schedule": (str, "cosine (default), linear or constant, after --warmup-steps"),
    "warmup_steps": (int, "linear warmup steps (default 0)"),
    "rank": (int, "LoRA rank (default 8)"),
    "alpha": (float, "LoRA alpha (default 2 x rank)"),
    "dropout": (float, "LoRA dropout (default 0.05)"),
    "batch_size": (int, "examples per micro-batch (default 4)"),
    "grad_accum": (int, "micro-batches per optimizer step (default 1)"),
    "max_length": (int, "tokens per example (default 256)"),
    "seed": (int, "LoRA init, dropout and data order (default 0)"),
    "eval_every": (int, "validate every K steps (default 50)"),
    "patience": (int, "evaluations without improvement before stopping; 0 = never (default 3)"),
    "max_grad_norm": (float, "gradient clipping (default 1.0)"),
    "weight_decay": (float, "AdamW weight decay (default 0)"),
    "precision": (str, "auto (default: bf16 on GPUs that support it, else fp32), bf16 or fp32"),
    "objective": (str, "ce (default: next-token loss), kd (distillation from the teacher) or kd+ce"),
    "teacher": (str, "kd's teacher (default: the model the input was pruned from, per its provenance)"),
    "temperature": (float, "kd's softening of both distributions (default 1)"),
    "kd_weight": (float, "kd+ce: kd_weight x kd + (1 - kd_weight) x ce (default 0.5)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="recovery of a checkpoint (LoRA, full, distillation), never returning a worse one",
                                   description=__doc__)
    parser.add_argument("--model", required=True, help="artifact:// URI, checkpoint dir, registered name, .gguf or hub id")
    parser.add_argument("--data", required=True,
                        help="registry dataset: alpaca instruction set (Alpaca prompt, loss on responses) or text corpus")
    for dest, (kind, text) in _SETTINGS_OPTIONS.items():
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, default=None, help=text)
    parser.add_argument("--full", action="store_true", help="train every parameter instead of LoRA adapters")
    parser.add_argument("--target-modules", default=None,
                        help="comma-separated projections (default all seven: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default PRUNELAB_DEVICE, else auto)")
    parser.add_argument("--out", type=Path, default=None, help="also write the merged checkpoint to this new directory")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    parser.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    from prunelab.cli.progress import job_progress
    from prunelab.config import settings
    from prunelab.tune import TuneSettings, run_tune
    from prunelab.tune.ranks import device_of_rank, process_group

    given = {dest: getattr(args, dest) for dest in _SETTINGS_OPTIONS if getattr(args, dest) is not None}
    if args.full:
        given["full"] = True
    if args.target_modules is not None:
        given["target_modules"] = tuple(name.strip() for name in args.target_modules.split(",") if name.strip())
    device = device_of_rank(args.device or settings().torch_device())
    with process_group(device) as ranks, job_progress("tune", silent=args.json or not ranks.main) as show:
        outcome = run_tune(
            args.model, TuneSettings(data=args.data, **given), device=device,
            out_dir=args.out, progress=lambda update: show(update.fraction, f"{update.phase}: {update.message}"),
        )
    if outcome is None:  # a torchrun rank other than 0: rank 0 prints the result
        return 0
    if args.json:
        print(json.dumps(outcome.as_dict()))
    else:
        print(f"held-out perplexity {outcome.heldout_ppl_before:.3f} -> {outcome.heldout_ppl_after:.3f} "
              f"(selection split, which chose the step: {outcome.val_ppl_before:.3f} -> {outcome.val_ppl_after:.3f})")
        print(f"result: {outcome.reason}")
        print(f"{outcome.trained} on {outcome.objective}, {outcome.tokens_seen} training tokens; peak memory "
              f"{outcome.peak_memory_bytes / 2**30:.2f} GiB ({outcome.memory_kind}), {outcome.wall_seconds:.1f} s")
        print(f"artifact {outcome.artifact.uri}" + (f"\nadapter {outcome.adapter.uri}" if outcome.adapter else "")
              + (f"\ncheckpoint {outcome.checkpoint_dir}" if outcome.checkpoint_dir else ""))
    return 0
