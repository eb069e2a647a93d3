"""profiler.proto messages to and from the library's types."""

from __future__ import annotations

from dataclasses import asdict

from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

import prunelab
from prunelab.errors import InvalidArgument
from prunelab.profile.latency import Spread
from prunelab.profile.memory import MemoryProfile
from prunelab.profile.options import ProfileOptions, default_batch_sizes
from prunelab.profile.profiler import BatchLatency, ModelProfile, ProfileReport, ProgressUpdate, RunEnvironment
from prunelab.profile.report import render_markdown, report_rows
from prunelab.profile.static import MacBreakdown, ParamCounts
from prunelab.v1 import common_pb2, profiler_pb2

PRODUCER = "profiler"
_ARTIFACT_KIND = "artifact"


def request_settings(request: profiler_pb2.ProfileRequest) -> tuple[str, str | None, ProfileOptions]:
    """The model spec, the baseline spec (None for none) and the options a request
    asks for; unset fields take ProfileOptions' defaults. Validation is the profiler's."""
    if not request.model:
        raise InvalidArgument("name the model to profile", field="model")
    defaults = ProfileOptions()

    def optional(field: str) -> int:
        return getattr(request, field) if request.HasField(field) else getattr(defaults, field)

    engine = request.engine or defaults.engine
    options = ProfileOptions(
        seq_len=optional("seq_len"),
        batch_sizes=tuple(request.batch_sizes) or default_batch_sizes(engine),
        gen_tokens=optional("gen_tokens"),
        repeats=optional("repeats"),
        warmup=optional("warmup"),
        device=request.device or defaults.device,
        dtype=request.dtype or defaults.dtype,
        threads=request.threads,
        measure_memory=not request.skip_memory,
        engine=engine,
        gguf_type=request.gguf_type or defaults.gguf_type,
    )
    return request.model, request.baseline or None, options


def progress_message(update: ProgressUpdate, job_id: str) -> common_pb2.Progress:
    return common_pb2.Progress(
        job_id=job_id, phase=update.phase, fraction=update.fraction, message=update.message, done=update.done, total=update.total
    )


def result_message(report: ProfileReport, job_id: str) -> profiler_pb2.ProfileResult:
    result = profiler_pb2.ProfileResult(
        job_id=job_id,
        model=_model(report.models[0]),
        environment=_environment(report.environment),
        report=_report(report, job_id),
    )
    if report.baseline is not None:
        result.baseline.CopyFrom(_model(report.baseline))
    return result


def _report(report: ProfileReport, job_id: str) -> common_pb2.Report:
    profiles = [p for p in (report.baseline, *report.models) if p is not None]
    params = Struct()
    params.update({"model": report.models[0].spec, "baseline": report.baseline.spec if report.baseline else None, **asdict(report.options)})
    created_at = Timestamp()
    created_at.GetCurrentTime()
    provenance = common_pb2.Provenance(
        job_id=job_id,
        producer=PRODUCER,
        version=prunelab.__version__,
        inputs=[
            common_pb2.ArtifactRef(uri=p.spec, digest=f"sha256:{p.sha256}", kind="model") for p in profiles if p.kind == _ARTIFACT_KIND
        ],
        params=params,
        created_at=created_at,
    )
    rows = report_rows(report)
    data = Struct()
    data.update({"rows": [asdict(row) for row in rows], "markdown": render_markdown(rows), "settings": asdict(report.options)})
    return common_pb2.Report(provenance=provenance, data=data)


def _model(profile: ModelProfile) -> profiler_pb2.ModelProfile:
    message = profiler_pb2.ModelProfile(
        spec=profile.spec,
        kind=profile.kind,
        sha256=profile.sha256,
        attn_implementation=profile.attn_implementation,
        params=_params(profile.params),
        macs=profile.macs,
        macs_analytic=_macs(profile.macs_analytic),
        nonzero_macs=profile.nonzero_macs,
        checkpoint_bytes=profile.checkpoint_bytes,
        latency=[_latency(latency) for latency in profile.latency],
    )
    if profile.memory is not None:
        message.memory.CopyFrom(_memory(profile.memory))
    return message


def _params(params: ParamCounts) -> profiler_pb2.ParameterCounts:
    return profiler_pb2.ParameterCounts(
        total=params.total,
        nonzero=params.nonzero,
        embeddings=params.embeddings,
        lm_head=params.lm_head,
        tied_embeddings=params.tied_embeddings,
        attention=params.attention,
        mlp=params.mlp,
        norms=params.norms,
        layers=[profiler_pb2.LayerParameters(**asdict(layer)) for layer in params.layers],
    )


def _macs(macs: MacBreakdown) -> profiler_pb2.MacBreakdown:
    return profiler_pb2.MacBreakdown(total=macs.total, **asdict(macs))


def _memory(memory: MemoryProfile) -> profiler_pb2.Memory:
    return profiler_pb2.Memory(**asdict(memory))  # reserved_bytes None leaves the optional field unset


def _latency(latency: BatchLatency) -> profiler_pb2.BatchLatency:
    message = profiler_pb2.BatchLatency(
        batch_size=latency.batch_size,
        prefill_ms=_spread(latency.prefill_ms),
        decode_tokens_per_s=_spread(latency.decode_tokens_per_s),
    )
    if latency.speedup is not None:
        message.speedup.CopyFrom(profiler_pb2.Speedup(prefill=_spread(latency.speedup.prefill), decode=_spread(latency.speedup.decode)))
    return message


def _spread(spread: Spread) -> profiler_pb2.Spread:
    return profiler_pb2.Spread(**asdict(spread))


def _environment(environment: RunEnvironment) -> profiler_pb2.RunEnvironment:
    return profiler_pb2.RunEnvironment(**asdict(environment))
