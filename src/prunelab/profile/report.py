"""A profile as report rows in the form of LLM-Pruner's Table 7 (parameters, MACs and
memory, each with its ratio to the base model) plus measured latency, decode
throughput and speedup per batch size; and those rows as Markdown.

Beside the dense parameters and MACs stand the nonzero ones: a sparse model keeps the
dense shapes with exact zeros in its weights, so its dense figures equal the base
model's, and its timings are those of dense kernels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prunelab.profile.profiler import ModelProfile, ProfileReport

MIB = 1024 * 1024
# A model counts as sparse when more than this share of its parameters are exact zeros;
# a dense checkpoint may hold a few by chance.
SPARSE_ZERO_SHARE = 0.01
DENSE_KERNELS_NOTE = (
    "Latency was measured with dense kernels: a model with zero weights runs at dense speed. Nonzero MACs are what a "
    "kernel skipping every zero weight could save, an ideal count, not a measurement; 2:4 semi-structured sparse "
    "kernels (CUDA only) were not timed."
)


@dataclass(frozen=True)
class BatchRow:
    batch_size: int
    prefill_ms: float  # median
    decode_tokens_per_s: float  # median
    prefill_speedup: float | None  # median of the per-round ratios; None for the baseline
    decode_speedup: float | None


@dataclass(frozen=True)
class ProfileRow:
    model: str
    role: str  # "baseline" or "model"
    params: int
    params_ratio: float | None  # of the baseline's: the fraction of parameters left
    nonzero_params: int  # parameters that are not exactly zero
    nonzero_params_ratio: float | None  # of the baseline's parameters
    macs: int
    macs_ratio: float | None
    nonzero_macs: int  # an ideal sparse kernel's count: zero weights skipped (see static.nonzero_macs)
    nonzero_macs_ratio: float | None  # of the baseline's (dense) MACs
    memory_bytes: int | None  # None when memory was not measured
    memory_ratio: float | None
    checkpoint_bytes: int
    batches: list[BatchRow]


def report_rows(report: ProfileReport) -> list[ProfileRow]:
    """One row per model, the baseline's first; ratios are None without a baseline."""
    base = report.baseline
    profiles = [base, *report.models] if base is not None else report.models
    return [_row(profile, base, "baseline" if profile is base else "model") for profile in profiles]


def is_sparse(params: int, nonzero_params: int) -> bool:
    """More than SPARSE_ZERO_SHARE of the parameters are exact zeros."""
    return params - nonzero_params > SPARSE_ZERO_SHARE * params


def render_markdown(rows: list[ProfileRow]) -> str:
    """The rows as a Markdown table, followed by DENSE_KERNELS_NOTE when a model is sparse."""
    batch_sizes = [batch.batch_size for batch in rows[0].batches] if rows else []
    header = ["Model", "Params", "Left", "Nonzero", "Nonzero left", "MACs", "MACs %", "Nonzero MACs", "Nonzero MACs %",
              "Memory", "Memory %", "Checkpoint"]
    for size in batch_sizes:
        header += [f"b{size} prefill ms", f"b{size} decode tok/s", f"b{size} speedup prefill / decode"]
    lines = [_markdown_line(header), _markdown_line(["---"] * len(header))]
    for row in rows:
        cells = [
            row.model,
            _count(row.params),
            _percent(row.params_ratio),
            _count(row.nonzero_params),
            _percent(row.nonzero_params_ratio),
            _count(row.macs),
            _percent(row.macs_ratio),
            _count(row.nonzero_macs),
            _percent(row.nonzero_macs_ratio),
            "–" if row.memory_bytes is None else f"{row.memory_bytes / MIB:.1f} MiB",
            _percent(row.memory_ratio),
            f"{row.checkpoint_bytes / MIB:.1f} MiB",
        ]
        for batch in row.batches:
            speedup = f"{_times(batch.prefill_speedup)} / {_times(batch.decode_speedup)}"
            cells += [f"{batch.prefill_ms:.1f}", f"{batch.decode_tokens_per_s:.1f}", speedup]
        lines.append(_markdown_line(cells))
    if any(is_sparse(row.params, row.nonzero_params) for row in rows):
        lines += ["", DENSE_KERNELS_NOTE]
    return "\n".join(lines)


def _row(profile: ModelProfile, base: ModelProfile | None, role: str) -> ProfileRow:
    memory = profile.memory.peak_bytes if profile.memory else None
    base_memory = base.memory.peak_bytes if base is not None and base.memory else None
    base_params, base_macs = (base.params.total, base.macs) if base else (None, None)
    return ProfileRow(
        model=Path(profile.spec).name if profile.kind in ("dir", "gguf") else profile.spec,
        role=role,
        params=profile.params.total,
        params_ratio=_ratio(profile.params.total, base_params),
        nonzero_params=profile.params.nonzero,
        nonzero_params_ratio=_ratio(profile.params.nonzero, base_params),
        macs=profile.macs,
        macs_ratio=_ratio(profile.macs, base_macs),
        nonzero_macs=profile.nonzero_macs,
        nonzero_macs_ratio=_ratio(profile.nonzero_macs, base_macs),
        memory_bytes=memory,
        memory_ratio=_ratio(memory, base_memory),
        checkpoint_bytes=profile.checkpoint_bytes,
        batches=[
            BatchRow(
                batch_size=latency.batch_size,
                prefill_ms=latency.prefill_ms.median,
                decode_tokens_per_s=latency.decode_tokens_per_s.median,
                prefill_speedup=latency.speedup.prefill.median if latency.speedup else None,
                decode_speedup=latency.speedup.decode.median if latency.speedup else None,
            )
            for latency in profile.latency
        ],
    )


def _ratio(value: int | None, base: int | None) -> float | None:
    return None if value is None or not base else value / base


def _count(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return str(value)


def _percent(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio * 100:.1f} %"


def _times(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}x"


def _markdown_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
