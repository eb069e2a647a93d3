"""`prunelab profile --model M [--baseline B] ...`: parameters, MACs, memory,
checkpoint size, prefill latency and decode throughput, and speedups against the
baseline measured in the same run."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prunelab.profile import ModelProfile, ProfileOptions, ProfileReport


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profile", help="measure a model's size, cost and speed", description=__doc__)
    parser.add_argument("--model", required=True, help="registered name, artifact:// URI, checkpoint directory or hub id")
    parser.add_argument("--baseline", help="a model to compare against, timed alternately with --model")
    add_options(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    parser.set_defaults(handler=_profile)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# ProfileOptions fields with a flag; a flag left unset takes the dataclass's default
# (spelled out in the help, not imported: importing prunelab.profile loads torch, and
# `prunelab --help` must not). dest -> (type, help).
_OPTION_FLAGS: dict[str, tuple[Any, str]] = {
    "seq_len": (int, "prompt length, also for MACs and memory (default 64)"),
    "batch_sizes": (_int_list, "comma-separated (default 1,8)"),
    "gen_tokens": (int, "decode steps per run (default 32)"),
    "repeats": (int, "timed rounds per batch size (default 5)"),
    "warmup": (int, "untimed rounds first (default 1)"),
    "device": (str, "cpu, cuda or cuda:N (default cpu)"),
    "dtype": (str, "float32, bfloat16 or float16 (default float32)"),
    "threads": (int, "torch (or llama.cpp) threads while timing (default: torch's)"),
    "engine": (str, "torch (default) or llama.cpp: time GGUF exports in llama.cpp (pip install 'prunelab[llama]'); batch size 1"),
    "gguf_type": (str, "llama.cpp: f16 (default) or q8_0 weights"),
}


def add_options(parser: argparse.ArgumentParser) -> None:
    """The ProfileOptions flags, shared with bench/profile.py."""
    for dest, (kind, text) in _OPTION_FLAGS.items():
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, help=text)
    parser.add_argument("--skip-memory", action="store_true", help="skip peak memory (a child process per model)")


def options_from(args: argparse.Namespace) -> ProfileOptions:
    from prunelab.profile import ProfileOptions
    from prunelab.profile.options import default_batch_sizes

    given = {dest: getattr(args, dest) for dest in _OPTION_FLAGS if getattr(args, dest) is not None}
    given.setdefault("batch_sizes", default_batch_sizes(given.get("engine", "torch")))
    return ProfileOptions(**given, measure_memory=not args.skip_memory)


def _profile(args: argparse.Namespace) -> int:
    from prunelab.cli.progress import job_progress
    from prunelab.profile import ProfileReport, render_markdown, report_rows, run_profile

    options = options_from(args)
    with job_progress("profile", plain=args.json) as show:
        for event in run_profile([args.model], baseline=args.baseline, options=options):
            if isinstance(event, ProfileReport):
                report = event
            else:
                show(event.fraction, f"{event.phase}: {event.message}")
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
        "nonzero_params": profile.params.nonzero,
        "macs": profile.macs,
        "nonzero_macs": profile.nonzero_macs,
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
