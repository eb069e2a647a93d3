"""A profile: static figures, memory and timed generation of one or more models,
optionally against a baseline measured in the same process, alternating with them.

`run_profile` is a generator of `ProgressUpdate`s that ends with the `ProfileReport`,
so the service can stream progress and a caller closing it stops the work between
steps; `profile_models` runs it to the end.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers

from prunelab.errors import InvalidArgument
from prunelab.models import LoadedModel, load_model, resolve_model
from prunelab.profile.latency import GenerationTiming, Spread, prompt_ids, time_generation, timed_round
from prunelab.profile.llama_cpp import engine_version as llama_cpp_version
from prunelab.profile.memory import MemoryProfile, measure_memory
from prunelab.profile.options import ProfileOptions, torch_dtype
from prunelab.profile.static import (
    MacBreakdown,
    ParamCounts,
    analytic_macs,
    checkpoint_bytes,
    count_parameters,
    nonzero_macs,
    ptflops_macs,
)

log = logging.getLogger(__name__)

# MACs and memory are for one forward pass of a single sequence of seq_len tokens.
STATIC_BATCH_SIZE = 1
# The share of the 0..1 progress scale each phase takes; latency takes the rest.
_MEMORY_SHARE, _LOAD_SHARE, _COUNT_SHARE = 0.15, 0.1, 0.05


@dataclass(frozen=True)
class Speedup:
    """Ratios over the rounds of one batch size, each from a round's own pair of runs."""

    prefill: Spread  # baseline prefill time / this model's
    decode: Spread  # this model's decode tokens/s / the baseline's


@dataclass(frozen=True)
class BatchLatency:
    batch_size: int
    prefill_ms: Spread
    decode_tokens_per_s: Spread
    speedup: Speedup | None  # None for the baseline itself, and without one


@dataclass(frozen=True)
class ModelProfile:
    spec: str
    kind: str  # how the spec was resolved: named, dir, artifact, gguf, hub
    sha256: str
    attn_implementation: str  # what the timings ran with; MACs always count eager attention
    params: ParamCounts
    macs: int  # ptflops, batch 1 x seq_len
    macs_analytic: MacBreakdown  # the formula, same pass
    nonzero_macs: int  # same pass, zero weights skipped: an ideal sparse kernel's count, not what ran
    checkpoint_bytes: int
    memory: MemoryProfile | None  # None when not measured
    latency: list[BatchLatency]


@dataclass(frozen=True)
class RunEnvironment:
    device: str
    dtype: str
    threads: int  # torch.get_num_threads() while timing
    cpu_count: int
    engine: str  # what the timings ran in: torch or llama.cpp
    engine_version: str
    machine: str
    gpu: str  # "" on CPU
    torch_version: str
    transformers_version: str


@dataclass(frozen=True)
class ProfileReport:
    options: ProfileOptions
    environment: RunEnvironment
    models: list[ModelProfile]
    baseline: ModelProfile | None


@dataclass(frozen=True)
class ProgressUpdate:
    phase: str  # load, count, memory, latency
    fraction: float
    message: str
    done: int
    total: int


Timer = Callable[[torch.Tensor, int], GenerationTiming]  # (prompt ids, decode steps) -> one timed generation
DEFAULT_OPTIONS = ProfileOptions()  # frozen, so one shared default is safe


def profile_models(models: Sequence[str], *, baseline: str | None = None, options: ProfileOptions = DEFAULT_OPTIONS) -> ProfileReport:
    """`run_profile` to its end, progress logged."""
    for event in run_profile(models, baseline=baseline, options=options):
        if isinstance(event, ProfileReport):
            return event
        log.info("%s: %s", event.phase, event.message)
    raise AssertionError("run_profile ends with its report")


def run_profile(
    models: Sequence[str], *, baseline: str | None = None, options: ProfileOptions = DEFAULT_OPTIONS
) -> Iterator[ProgressUpdate | ProfileReport]:
    """Profile `models` (specs as `load_model` takes them), each against `baseline` if given."""
    options.validate()
    specs = _specs_baseline_first(models, baseline)
    distinct = list(dict.fromkeys(specs))  # a model profiled against itself is loaded once, timed twice per round
    memory_end = _MEMORY_SHARE if options.measure_memory else 0.0
    loaded_end = memory_end + _LOAD_SHARE
    counted_end = loaded_end + _COUNT_SHARE
    for spec in distinct:  # a bad spec fails now; a first use converts or downloads once, here
        resolve_model(spec)
    with _torch_threads(options.threads):
        # memory first, while this process holds no model: the machine then needs room
        # for one model more, not for all of them and a copy
        memory = (yield from _measure_memory(distinct, options, memory_end)) if options.measure_memory else {}
        loaded = yield from _load(distinct, options, memory_end, loaded_end)
        static = {spec: _static_figures(entry, options.seq_len) for spec, entry in loaded.items()}
        yield ProgressUpdate("count", counted_end, "counted parameters and MACs", len(static), len(static))
        vocab_size = min(entry.model.get_output_embeddings().out_features for entry in loaded.values())
        with _timers(loaded, specs, options) as timers:
            rounds = yield from _time_rounds(timers, vocab_size, options, counted_end)
        environment = _environment(options)
    has_baseline = baseline is not None
    baseline_runs = _runs_of(rounds, 0) if has_baseline else None
    profiles = [
        _model_profile(loaded[spec], static[spec], memory.get(spec), _runs_of(rounds, index), baseline_runs if index else None)
        for index, spec in enumerate(specs)
    ]
    yield ProfileReport(
        options=options,
        environment=environment,
        models=profiles[1:] if has_baseline else profiles,
        baseline=profiles[0] if has_baseline else None,
    )


@dataclass(frozen=True)
class _StaticFigures:
    params: ParamCounts
    macs: int
    macs_analytic: MacBreakdown
    nonzero_macs: int
    checkpoint_bytes: int


def _specs_baseline_first(models: Sequence[str], baseline: str | None) -> list[str]:
    """The baseline first (when given), then the models."""
    if isinstance(models, str) or not models:
        raise InvalidArgument("name at least one model to profile", field="model")
    specs = [baseline, *models] if baseline is not None else list(models)
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise InvalidArgument("a model spec is empty", field="baseline" if spec is baseline else "model")
    return specs


def _load(specs: list[str], options: ProfileOptions, start: float, end: float) -> Generator[ProgressUpdate, None, dict[str, LoadedModel]]:
    loaded = {}
    for done, spec in enumerate(specs, 1):
        loaded[spec] = load_model(spec, dtype=torch_dtype(options.dtype), device=options.device)
        yield ProgressUpdate("load", _between(start, end, done / len(specs)), f"loaded {spec}", done, len(specs))
    return loaded


def _static_figures(loaded: LoadedModel, seq_len: int) -> _StaticFigures:
    model = loaded.model
    macs, formula = ptflops_macs(model, seq_len, STATIC_BATCH_SIZE), analytic_macs(model, seq_len, STATIC_BATCH_SIZE)
    if macs != formula.total:  # e.g. a layer kind the formula does not know; both are reported
        log.warning("%s: ptflops counts %d MACs, the analytic formula %d", loaded.source.spec, macs, formula.total)
    return _StaticFigures(
        count_parameters(model), macs, formula, nonzero_macs(model, macs, seq_len, STATIC_BATCH_SIZE), checkpoint_bytes(loaded.source.path)
    )


def _measure_memory(specs: list[str], options: ProfileOptions, end: float) -> Generator[ProgressUpdate, None, dict[str, MemoryProfile]]:
    memory = {}
    for done, spec in enumerate(specs, 1):
        memory[spec] = measure_memory(spec, seq_len=options.seq_len, batch_size=STATIC_BATCH_SIZE, dtype=options.dtype, device=options.device)
        message = f"peak memory of {spec}: {memory[spec].peak_bytes / 2**20:.1f} MiB"
        yield ProgressUpdate("memory", _between(0.0, end, done / len(specs)), message, done, len(specs))
    return memory


@contextmanager
def _timers(loaded: dict[str, LoadedModel], specs: list[str], options: ProfileOptions) -> Iterator[list[Timer]]:
    """One timer per spec, in order: torch's on the loaded models, or llama.cpp's on
    GGUF exports of them (made here, removed afterwards)."""
    if options.engine == "torch":
        yield [functools.partial(time_generation, loaded[spec].model) for spec in specs]
        return
    from prunelab.profile.llama_cpp import ExportedModels

    exported = ExportedModels(list(loaded), options.gguf_type, n_ctx=options.seq_len + options.gen_tokens + 1, threads=options.threads)
    try:
        yield [exported.models[spec].time_generation for spec in specs]
    finally:
        exported.close()


def _time_rounds(
    timers: list[Timer], vocab_size: int, options: ProfileOptions, start: float
) -> Generator[ProgressUpdate, None, dict[int, list[list[GenerationTiming]]]]:
    """Per batch size, the timed rounds, each with one timing per model in order."""
    device = torch.device(options.device)
    total = len(options.batch_sizes) * (options.warmup + options.repeats)
    rounds: dict[int, list[list[GenerationTiming]]] = {}
    done = 0
    for batch_size in options.batch_sizes:
        input_ids = prompt_ids(batch_size, options.seq_len, vocab_size, device)
        rounds[batch_size] = []
        for round_index in range(options.warmup + options.repeats):
            # counted from the first timed round, so timed rounds start with the baseline and alternate
            timings = timed_round(timers, input_ids, options.gen_tokens, round_index - options.warmup)
            if round_index >= options.warmup:
                rounds[batch_size].append(timings)
            done += 1
            kind = "warm-up" if round_index < options.warmup else "timed"
            yield ProgressUpdate(
                "latency", _between(start, 1.0, done / total), f"batch {batch_size}: {kind} round done", done, total
            )
    return rounds


def _between(start: float, end: float, fraction: float) -> float:
    return start + (end - start) * fraction


def _runs_of(rounds: dict[int, list[list[GenerationTiming]]], index: int) -> dict[int, list[GenerationTiming]]:
    """The timings of the `index`-th model (baseline first), per batch size."""
    return {size: [timings[index] for timings in by_round] for size, by_round in rounds.items()}


def _model_profile(
    loaded: LoadedModel,
    static: _StaticFigures,
    memory: MemoryProfile | None,
    timings: dict[int, list[GenerationTiming]],
    baseline_timings: dict[int, list[GenerationTiming]] | None,
) -> ModelProfile:
    return ModelProfile(
        spec=loaded.source.spec,
        kind=loaded.source.kind,
        sha256=loaded.source.sha256,
        attn_implementation=loaded.model.config._attn_implementation,
        params=static.params,
        macs=static.macs,
        macs_analytic=static.macs_analytic,
        nonzero_macs=static.nonzero_macs,
        checkpoint_bytes=static.checkpoint_bytes,
        memory=memory,
        latency=[
            _batch_latency(size, runs, baseline_timings[size] if baseline_timings else None) for size, runs in timings.items()
        ],
    )


def _batch_latency(batch_size: int, runs: list[GenerationTiming], baseline_runs: list[GenerationTiming] | None) -> BatchLatency:
    speedup = None
    if baseline_runs is not None:
        pairs = list(zip(runs, baseline_runs, strict=False))  # the two runs of one round
        speedup = Speedup(
            prefill=Spread.of([base.prefill_s / own.prefill_s for own, base in pairs]),
            decode=Spread.of([own.decode_tokens_per_s / base.decode_tokens_per_s for own, base in pairs]),
        )
    return BatchLatency(
        batch_size=batch_size,
        prefill_ms=Spread.of([run.prefill_ms for run in runs]),
        decode_tokens_per_s=Spread.of([run.decode_tokens_per_s for run in runs]),
        speedup=speedup,
    )


def _environment(options: ProfileOptions) -> RunEnvironment:
    device = torch.device(options.device)
    return RunEnvironment(
        device=options.device,
        dtype=options.dtype,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count() or 0,
        engine=options.engine,
        engine_version=torch.__version__ if options.engine == "torch" else llama_cpp_version(),
        machine=platform.processor() or platform.machine(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
    )


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with `threads` intra-op threads (0: as they are), restored afterwards."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
