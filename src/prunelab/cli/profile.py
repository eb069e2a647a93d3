"""`prunelab profile --model M [--baseline B] ...`: parameters, MACs, memory,
checkpoint size, prefill latency and decode throughput, and speedups against the
baseline measured in the same run."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from prunelab.profile import ModelProfile, ProfileOptions, ProfileReport, profile_models, render_markdown, report_rows

DEFAULTS = ProfileOptions()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help="measure a model's size, cost and speed", description=__doc__)
    parser.add_argument("--model", required=True, help="registered name, artifact:// URI, checkpoint directory or hub id")
    parser.add_argument("--baseline", help="a model to compare against, timed alternately with --model")
    add_options(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    parser.set_defaults(handler=_profile)


def add_options(parser: argparse.ArgumentParser) -> None:
    """The ProfileOptions flags, shared with bench/profile.py."""
    parser.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="prompt length, also for MACs and memory (default %(default)s)")
    parser.add_argument(
        "--batch-sizes", type=_int_list, default=DEFAULTS.batch_sizes, help="comma-separated (default 1,8)"
    )
    parser.add_argument("--gen-tokens", type=int, default=DEFAULTS.gen_tokens, help="decode steps per run (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=DEFAULTS.repeats, help="timed rounds per batch size (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULTS.warmup, help="untimed rounds first (default %(default)s)")
    parser.add_argument("--device", default=DEFAULTS.device, help="cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--dtype", default=DEFAULTS.dtype, help="float32, bfloat16 or float16 (default %(default)s)")
    parser.add_argument("--threads", type=int, default=DEFAULTS.threads, help="torch threads while timing (default: torch's)")
    parser.add_argument("--skip-memory", action="store_true", help="skip peak memory (a child process per model)")


def options_from(args: argparse.Namespace) -> ProfileOptions:
    return ProfileOptions(
        seq_len=args.seq_len,
        batch_sizes=args.batch_sizes,
        gen_tokens=args.gen_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        measure_memory=not args.skip_memory,
    )


def _profile(args: argparse.Namespace) -> int:
    options = options_from(args)
    report = profile_models([args.model], baseline=args.baseline, options=options)
    if args.json:
        print(json.dumps(summary(report), indent=2))
    else:
        env = report.environment
        tied = "; tied embeddings counted once" if report.models[0].params.tied_embeddings else ""
        print(f"{env.device}, {env.dtype}, {env.threads} threads; MACs and memory at 1 x {options.seq_len} tokens{tied}")
        print(render_markdown(report_rows(report)))
    return 0


def summary(report: ProfileReport) -> dict[str, Any]:
    """The headline figures of the profiled model, its baseline's, and the run's settings."""
    return {
        **_model_summary(report.models[0]),
        "baseline": _model_summary(report.baseline) if report.baseline else None,
        "environment": asdict(report.environment),
        "settings": asdict(report.options),
    }


def _model_summary(profile: ModelProfile) -> dict[str, Any]:
    return {
        "model": profile.spec,
        "params": profile.params.total,
        "macs": profile.macs,
        "memory_bytes": profile.memory.peak_bytes if profile.memory else None,
        "checkpoint_bytes": profile.checkpoint_bytes,
        "latency": {
            str(latency.batch_size): {
                "prefill_ms": latency.prefill_ms.median,
                "decode_tokens_per_s": latency.decode_tokens_per_s.median,
                **(
                    {"speedup": {"prefill": latency.speedup.prefill.median, "decode": latency.speedup.decode.median}}
                    if latency.speedup
                    else {}
                ),
            }
            for latency in profile.latency
        },
    }


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
