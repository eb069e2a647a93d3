"""Profiler benchmark: SmolLM2-135M against copies with 20 % and 50 % of its
parameters removed, each in both checkpoint layouts, all profiled in one run and
timed alternately with the base model.

    python bench/profile.py [--repeats 5] [--gen-tokens 32] [--threads N] [--out DIR]

Goal: decode tokens/s with 50 % of the parameters removed >= 1.6x the base model's,
at batch 1 and 8, on CPU.

The pruned copies are cut with the model adapter, not by the pruner: they keep the
first KV groups and MLP channels of each layer, which changes nothing about speed.
Layouts: "uniform" (every layer the same widths: a plain LlamaConfig checkpoint) and
"per-layer" (the first three and the last layer untouched, the others cut harder,
increasingly so with depth: a `layer_widths` checkpoint). "floor" keeps one KV group
and one MLP channel per layer: about the least any structured pruning of these 30
layers can cost, so its speedup bounds what pruning can buy on this machine.
After the table, the figures that explain the speedups: where the MACs of a decode
step go, what ratio the MACs alone would predict, and how much of a step no width cut
can remove (the floor model's step, the lm_head matmul in it).

Threads: on a machine other jobs share, use --threads 1. Several OpenMP threads
competing with other processes for the cores wait on each other at every operation
(here, 2 threads at a load average of 6 decoded 4-5x slower than 1 thread) and the
ratios lose their meaning.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run as a script, this file's folder leads sys.path and its name shadows the stdlib
# `profile` module, which cProfile (imported by torch) imports: take the folder off.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from prunelab.cli import profile as profile_cli  # noqa: E402
from prunelab.config import settings  # noqa: E402
from prunelab.logs import setup_logging  # noqa: E402
from prunelab.models import LlamaFamilyAdapter, load_model, save_checkpoint  # noqa: E402
from prunelab.profile import (  # noqa: E402
    ModelProfile,
    ProfileReport,
    profile_models,
    render_markdown,
    report_rows,
)

BASE = "smollm2-135m"
GOAL_RATIO, GOAL_SPEEDUP = 0.5, 1.6
PROTECTED_FIRST, PROTECTED_LAST = 3, 1  # layers the per-layer layout leaves whole
DEPTH_WEIGHTS = (0.75, 1.25)  # per-layer layout: the share of the cut, first to last cut layer


@dataclass(frozen=True)
class Cut:
    """What one pruned copy keeps in each layer."""

    name: str
    kv_groups: list[int]
    mlp_channels: list[int]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(settings().log_level)  # progress on stderr
    out = args.out or settings().cache_dir / "bench-profile"
    base = load_model(BASE)
    cuts = [_cut(base.model, ratio, layout) for ratio in args.ratios for layout in ("uniform", "per-layer")]
    cuts.append(_floor(base.model))
    specs = [str(_checkpoint(base, cut, out)) for cut in cuts]
    options = profile_cli.options_from(args)
    load_before = os.getloadavg()[0]
    report = profile_models(specs, baseline=BASE, options=options)
    print(f"\nload average (1 min) {load_before:.1f} before the profile, {os.getloadavg()[0]:.1f} after")
    _print_report(report, cuts, base.model.get_output_embeddings())
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=_floats, default=(0.2, 0.5), help="fractions of parameters to remove (default 0.2,0.5)")
    profile_cli.add_options(parser)
    parser.add_argument("--out", type=Path, help="where the pruned checkpoints go (default: <cache>/bench-profile)")
    return parser


# ---- pruned copies ----


def _cut(model, ratio: float, layout: str) -> Cut:
    """Widths per layer removing `ratio` of all parameters (embeddings included in the
    count, never cut). A layer's share of the removal goes first to whole KV groups, in
    about the proportion it removes from the layer, and the rest to MLP channels."""
    adapter = LlamaFamilyAdapter(model)
    [widths] = set(adapter.layer_widths())  # the base model is uniform
    hidden, head_dim = adapter.hidden_size, adapter.head_dim
    groups = widths.num_key_value_heads
    group_params = 2 * hidden * head_dim * (widths.num_attention_heads // groups + 1)  # q+o rows/cols, k+v rows
    channel_params = 3 * hidden
    layer_params = groups * group_params + widths.intermediate_size * channel_params
    weights = _layer_weights(adapter.num_layers, layout)
    to_remove = ratio * adapter.num_parameters()
    kv_groups, channels = [], []
    for weight in weights:
        share = to_remove * weight / sum(weights)
        kept_groups = max(1, round(groups * (1 - share / layer_params)))
        mlp_cut = round((share - (groups - kept_groups) * group_params) / channel_params)
        kv_groups.append(kept_groups)
        channels.append(min(widths.intermediate_size, max(1, widths.intermediate_size - mlp_cut)))
    return Cut(f"{BASE}-{layout}-{round(ratio * 100)}pct", kv_groups, channels)


def _layer_weights(num_layers: int, layout: str) -> list[float]:
    if layout == "uniform":
        return [1.0] * num_layers
    cut_layers = num_layers - PROTECTED_FIRST - PROTECTED_LAST
    low, high = DEPTH_WEIGHTS
    ramp = [low + (high - low) * i / (cut_layers - 1) for i in range(cut_layers)]
    return [0.0] * PROTECTED_FIRST + ramp + [0.0] * PROTECTED_LAST


def _floor(model) -> Cut:
    layers = LlamaFamilyAdapter(model).num_layers
    return Cut(f"{BASE}-floor", [1] * layers, [1] * layers)


def _checkpoint(base, cut: Cut, out: Path) -> Path:
    """The cut copy's checkpoint, made on first use."""
    path = out / cut.name
    if path.is_dir():
        return path
    copy = load_model(BASE)
    adapter = LlamaFamilyAdapter(copy.model)
    for layer, (groups, channels) in enumerate(zip(cut.kv_groups, cut.mlp_channels, strict=False)):
        adapter.keep_kv_groups(layer, list(range(groups)))
        adapter.keep_mlp_channels(layer, list(range(channels)))
    provenance = {"base_model_id": base.source.base_id, "base_model_sha256": base.source.sha256, "method": "bench slice (first units kept)"}
    return save_checkpoint(copy.model, copy.tokenizer, path, provenance)


# ---- output ----


def _print_report(report: ProfileReport, cuts: list[Cut], lm_head: torch.nn.Linear) -> None:
    env, options = report.environment, report.options
    print(f"{env.machine}, {env.cpu_count} CPUs, torch {env.torch_version} ({env.threads} threads), {env.device}, {env.dtype}")
    print(f"prompt {options.seq_len} tokens, {options.gen_tokens} decode steps (KV cache, greedy), {options.warmup} warm-up + "
          f"{options.repeats} timed rounds alternating all models; MACs and memory at 1 x {options.seq_len}\n")
    print(render_markdown(report_rows(report)))
    print("\nWidths (KV groups / MLP channels per layer, min-max):")
    for cut in cuts:
        print(f"  {cut.name}: groups {min(cut.kv_groups)}-{max(cut.kv_groups)}, channels {min(cut.mlp_channels)}-{max(cut.mlp_channels)}")
    print("\nWhy: a decode step's MACs per token (linear maps; attention over the cache is extra) and the speedup they predict")
    base = report.baseline
    for profile in [base, *report.models]:
        print("  " + _decode_cost_line(profile, base, options.seq_len))
    print(f"  base parameters: embeddings {base.params.embeddings / 1e6:.1f} M (tied with lm_head, counted once) of {base.params.total / 1e6:.1f} M")
    floor = next(profile for profile in report.models if profile.spec.endswith("-floor"))
    for batch_index, batch_size in enumerate(options.batch_sizes):
        print("  " + _step_cost_line(report, floor, lm_head, batch_index, batch_size))
    _print_goal(report)


def _step_cost_line(report: ProfileReport, floor: ModelProfile, lm_head: torch.nn.Linear, batch_index: int, batch_size: int) -> str:
    """Decode step time as fixed + a part proportional to the layers' MACs, the two
    fitted from the base and the floor model (whose layers are nearly empty, leaving
    lm_head, embeddings, cache and the per-operation overhead of all 30 layers)."""
    seq_len = report.options.seq_len

    def step_ms(profile: ModelProfile) -> float:
        return 1000 * batch_size / profile.latency[batch_index].decode_tokens_per_s.median

    def layer_macs(profile: ModelProfile) -> float:
        return _per_token_macs(profile, seq_len)[0]

    base = report.baseline
    fixed, per_mac = step_ms(floor), (step_ms(base) - step_ms(floor)) / (layer_macs(base) - layer_macs(floor))
    predicted = {
        Path(p.spec).name.removeprefix(BASE + "-"): step_ms(base) / (fixed + per_mac * (layer_macs(p) - layer_macs(floor)))
        for p in report.models
        if p is not floor
    }
    fits = ", ".join(f"{name} {speedup:.2f}x" for name, speedup in predicted.items())
    lm_head_ms = _lm_head_ms(lm_head, batch_size, report.environment.threads)
    return (
        f"b{batch_size}: a step takes {step_ms(base):.1f} ms in the base, {fixed:.1f} ms without (nearly) any layer width "
        f"(lm_head matmul {lm_head_ms:.1f} ms; the rest is mostly the per-operation overhead of 30 layers): cutting layer widths can buy "
        f"at most {step_ms(base) / fixed:.2f}x; that fit predicts {fits}"
    )


def _lm_head_ms(lm_head: torch.nn.Linear, batch_size: int, threads: int, runs: int = 30) -> float:
    """Median time of one decode step's lm_head matmul (batch x hidden @ hidden x vocab)
    at the profile's thread count."""
    states = torch.randn(batch_size, 1, lm_head.in_features)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = []
    with torch.inference_mode():
        for _ in range(runs):
            started = time.perf_counter()
            lm_head(states)
            times.append(time.perf_counter() - started)
    torch.set_num_threads(previous)
    return 1000 * statistics.median(times[3:])  # the first runs warm the caches


def _decode_cost_line(profile: ModelProfile, base: ModelProfile, seq_len: int) -> str:
    layers, lm_head = _per_token_macs(profile, seq_len)
    base_layers, base_lm_head = _per_token_macs(base, seq_len)
    predicted = (base_layers + base_lm_head) / (layers + lm_head)
    measured = ", ".join(
        f"b{latency.batch_size} {latency.speedup.decode.median:.2f}x (IQR {latency.speedup.decode.q1:.2f}-{latency.speedup.decode.q3:.2f})"
        for latency in profile.latency
        if latency.speedup
    )
    name = Path(profile.spec).name
    return (
        f"{name}: layers {layers / 1e6:.1f} M + lm_head {lm_head / 1e6:.1f} M ({lm_head / (layers + lm_head):.0%}); "
        f"MACs predict {predicted:.2f}x" + (f", measured decode {measured}" if measured else "")
    )


def _per_token_macs(profile: ModelProfile, seq_len: int) -> tuple[float, float]:
    macs = profile.macs_analytic
    return (macs.attention_projections + macs.mlp) / seq_len, macs.lm_head / seq_len


def _print_goal(report: ProfileReport) -> None:
    ratio_tag = f"-{round(GOAL_RATIO * 100)}pct"
    print(f"\nGoal: decode tokens/s at {GOAL_RATIO:.0%} of parameters removed >= {GOAL_SPEEDUP}x the base")
    for profile in report.models:
        if not profile.spec.endswith(ratio_tag):
            continue
        for latency in profile.latency:
            speedup = latency.speedup.decode.median
            verdict = "met" if speedup >= GOAL_SPEEDUP else "short"
            print(f"  {Path(profile.spec).name} batch {latency.batch_size}: {speedup:.2f}x  {verdict}")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


if __name__ == "__main__":
    sys.exit(main())
