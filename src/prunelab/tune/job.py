"""One tuning job end to end: load the checkpoint (and, to distil, its teacher), build
the data, train LoRA or every parameter under the guard (resuming a saved state of
the same job), fold the best adapter into the weights, publish the model (kind
"model") and, for LoRA, the adapter (kind "adapter"). A sparse input's zeros are set
again after the fold, or after every update when all parameters train (see
sparsity.py). The CLI and the tuner service both call `run_tune`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from prunelab.errors import FailedPrecondition, InvalidArgument
from prunelab.models import LoadedModel, load_model, read_provenance, save_checkpoint
from prunelab.prune.memory import PeakMemory
from prunelab.store import ArtifactRef, ArtifactStore, open_store
from prunelab.tune.data import TuneData, build_tune_data, dataset_format
from prunelab.tune.objective import Objective
from prunelab.tune.ranks import ONE_PROCESS, Ranks
from prunelab.tune.settings import TuneSettings, training_dtype
from prunelab.tune.sparsity import ZeroPattern, sparsity_record
from prunelab.tune.state import CurvePoint, JobDirectory, job_directory
from prunelab.tune.trainer import (
    BeforeStep,
    Trainer,
    TrainingProgress,
    TrainingResult,
    perplexity_of,
    tensor_bytes,
    validation_loss,
)

log = logging.getLogger(__name__)

JOB_KEY_VERSION = 2  # bump when a change makes old snapshots unusable
TRAIN_START, TRAIN_END = 0.05, 0.95  # share of the job's progress the training takes


@dataclass(frozen=True)
class TuneUpdate:
    phase: str  # load | train | save | done
    fraction: float  # 0..1 over the whole job
    message: str
    training: TrainingProgress | None = None  # in the train phase


Progress = Callable[[TuneUpdate], None]


def no_progress(_update: TuneUpdate) -> None:
    pass


@dataclass
class TuneOutcome:
    artifact: ArtifactRef  # the merged model
    adapter: ArtifactRef | None  # peft's adapter directory of the best step; None when all parameters trained
    checkpoint_dir: Path | None  # the plain directory written when out_dir was given
    val_ppl_before: float  # selection split: the split that chose best_step
    val_ppl_after: float  # selection split, measured on the returned model (never above before: it chose the step)
    heldout_ppl_before: float  # held-out split, never seen by training or selection: the input's
    heldout_ppl_after: float  # held-out split: the returned model's, the unbiased recovery figure
    best_step: int
    reason: str
    stop: str  # completed | early_stop | non_finite
    curve: list[CurvePoint]
    steps_run: int
    total_steps: int
    resumed_from_step: int | None
    precision: str
    trained: str  # lora | full
    trainable_params: int  # LoRA's adapter weights, or every weight
    objective: str
    teacher: dict[str, str] | None  # the kd teacher's spec and sha256
    tokens_seen: int  # labelled training tokens of the steps run
    memory: dict[str, int]  # bytes of the student's weights, the teacher's and the optimizer state
    data: dict[str, Any]
    input_model: str
    input_sha256: str
    peak_memory_bytes: int
    memory_kind: str
    wall_seconds: float

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record.update(
            artifact=self.artifact.uri,
            adapter=self.adapter.uri if self.adapter else None,
            checkpoint_dir=str(self.checkpoint_dir) if self.checkpoint_dir else None,
        )
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> TuneOutcome:
        """The outcome `as_dict` wrote (in another process), its artifacts read back from the store."""
        store = open_store()
        return cls(**{
            **record,
            "artifact": store.stat(record["artifact"]),
            "adapter": store.stat(record["adapter"]) if record["adapter"] else None,
            "checkpoint_dir": Path(record["checkpoint_dir"]) if record["checkpoint_dir"] else None,
            "curve": [CurvePoint(**point) for point in record["curve"]],
        })


def check_tune_inputs(settings: TuneSettings) -> None:
    """Everything that can be refused before loading a model (InvalidArgument)."""
    settings.validate()
    dataset_format(settings.data, settings.data_split, "data")
    if settings.val_data:
        dataset_format(settings.val_data, settings.val_split, "val_data")


def run_tune(
    model: str,
    settings: TuneSettings,
    *,
    device: str = "cpu",
    out_dir: Path | None = None,
    progress: Progress = no_progress,
    before_step: BeforeStep | None = None,
) -> TuneOutcome | None:
    """Tune `model` (LoRA or all parameters, on settings.objective) and publish the
    result, never worse on validation than the input. Bad input fails before anything
    is written. An interrupted run leaves its state in the job directory, and the next
    run of the same job resumes from it. Under torchrun every rank calls this; rank 0
    reports, publishes and returns the outcome, the others None (ranks.py).
    `before_step` is a test and diagnostics hook (see trainer.BeforeStep)."""
    check_tune_inputs(settings)
    if out_dir is not None and Path(out_dir).exists():
        raise InvalidArgument(f"{out_dir} already exists; checkpoints are never overwritten", field="out_dir")
    started = time.perf_counter()
    ranks = Ranks.current()
    progress = progress if ranks.main else no_progress
    dtype = training_dtype(settings.precision, device)
    cuda_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    # Opened first: an unreachable store fails the job before any work, and an outage
    # during it costs the upload's retries (PRUNELAB_S3_RETRY_S), not the training.
    store = open_store()
    # The job seeds torch's global RNG (LoRA init, dropout); fork_rng gives the caller its own back.
    with PeakMemory(device) as memory, torch.random.fork_rng(devices=cuda_devices):
        progress(TuneUpdate("load", 0.0, f"loading {model}"))
        loaded = load_model(model, dtype=dtype, device=device)
        data = build_tune_data(loaded.tokenizer, settings)
        teacher = load_teacher(loaded, settings, dtype, device)
        heldout_before = _heldout_loss(loaded.model, data, settings, loaded.tokenizer, ranks)  # before LoRA wraps the model
        zeros = ZeroPattern.of_sparse(loaded)  # before training: the input's zeros, None when it is dense
        directory = job_directory(job_key(loaded, data, settings, dtype, device, teacher))
        with directory.locked() if ranks.main else nullcontext(directory) as snapshots:
            trained, training = _train(loaded, data, settings, snapshots, progress, before_step, teacher, zeros)
            if not ranks.main:
                ranks.barrier()  # until rank 0 has published
                return None
            trainable_params = sum(p.numel() for p in trained.parameters() if p.requires_grad)
            progress(TuneUpdate("save", TRAIN_END, f"{training.reason}; writing the model"))
            published = _publish(loaded, trained, data, settings, training, dtype, out_dir, heldout_before, zeros, teacher, store)
            snapshots.remove()  # the artifacts are stored; a rerun starts afresh
            ranks.barrier()
    outcome = TuneOutcome(
        **published,
        stop=training.state.stop,
        curve=training.state.curve,
        steps_run=training.state.step,
        total_steps=training.total_steps,
        resumed_from_step=training.resumed_from_step,
        precision=str(dtype).removeprefix("torch."),
        trained=settings.trained,
        trainable_params=trainable_params,
        objective=settings.objective,
        teacher=_teacher_record(teacher),
        tokens_seen=training.state.tokens_seen,
        memory={"student_bytes": tensor_bytes(trained.parameters()),
                "teacher_bytes": tensor_bytes(teacher.model.parameters()) if teacher else 0,
                "optimizer_bytes": training.optimizer_bytes},
        data=data.identity,
        input_model=loaded.source.spec,
        input_sha256=loaded.source.sha256,
        peak_memory_bytes=memory.peak_bytes,
        memory_kind=memory.kind,
        wall_seconds=round(time.perf_counter() - started, 3),
    )
    progress(TuneUpdate("done", 1.0, f"{outcome.reason} -> {outcome.artifact.uri}"))
    return outcome


def job_key(loaded: LoadedModel, data: TuneData, settings: TuneSettings, dtype: torch.dtype, device: str,
            teacher: LoadedModel | None = None) -> str:
    """The job's identity: a hash of every input that decides the result."""
    inputs = {
        "version": JOB_KEY_VERSION,
        "model_sha256": loaded.source.sha256,
        "teacher_sha256": teacher.source.sha256 if teacher else None,
        "data": data.identity,
        "settings": settings.as_dict(),
        "dtype": str(dtype),
        "device_type": torch.device(device).type,  # RNG states differ between CPU and CUDA
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def base_model_spec(provenance: dict[str, Any]) -> str:
    """The model the pruner read, from a pruned checkpoint's provenance or, for a tuned
    one, from its input's (as deep as tuning was repeated); "" when none is recorded."""
    while provenance:
        if provenance.get("base_model_spec"):
            return provenance["base_model_spec"]
        provenance = provenance.get("input_provenance") or {}
    return ""


def load_teacher(loaded: LoadedModel, settings: TuneSettings, dtype: torch.dtype, device: str) -> LoadedModel | None:
    """The kd teacher, frozen in eval mode in the student's dtype and device: the model
    named, else the one the input was pruned from, checked to be the weights it was
    pruned from. None for the ce objective."""
    if settings.objective == "ce":
        return None
    provenance = read_provenance(loaded.source.path)
    spec = settings.teacher.strip() or base_model_spec(provenance)
    if not spec:
        raise InvalidArgument(f"{loaded.source.spec} records no model it was pruned from; name a teacher", field="teacher")
    teacher = load_model(spec, dtype=dtype, device=device)
    expected = provenance.get("base_model_sha256")
    if not settings.teacher.strip() and expected and teacher.source.sha256 != expected:
        raise FailedPrecondition(
            f"{spec}, the model {loaded.source.spec} was pruned from, now holds other weights "
            f"({teacher.source.sha256[:12]}, pruned from {expected[:12]}); name the teacher", field="teacher")
    if teacher.model.config.vocab_size != loaded.model.config.vocab_size:
        raise InvalidArgument(f"the teacher {spec} has {teacher.model.config.vocab_size} tokens in its vocabulary, "
                              f"the student {loaded.model.config.vocab_size}; kd compares their distributions", field="teacher")
    teacher.model.eval().requires_grad_(False)
    return teacher


def _teacher_record(teacher: LoadedModel | None) -> dict[str, str] | None:
    return {"spec": teacher.source.spec, "sha256": teacher.source.sha256} if teacher else None


def lora_config(settings: TuneSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def pad_token_id(tokenizer) -> int:
    """Padding is masked out of attention and loss, so any id will do; the
    tokenizer's pad, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _train(
    loaded: LoadedModel, data: TuneData, settings: TuneSettings, snapshots: JobDirectory,
    progress: Progress, before_step: BeforeStep | None, teacher: LoadedModel | None, zeros: ZeroPattern | None,
) -> tuple[PeftModel | PreTrainedModel, TrainingResult]:
    """The model trained (peft's wrapper, or the input itself when all parameters train) and how it went."""
    torch.manual_seed(settings.seed)  # LoRA's random A matrices, then dropout
    if settings.full:
        trained = loaded.model.requires_grad_(True)
    else:
        trained = get_peft_model(loaded.model, lora_config(settings))
    objective = Objective(settings.objective, teacher.model if teacher else None, settings.temperature, settings.kd_weight)

    def report(update: TrainingProgress) -> None:
        fraction = TRAIN_START + (TRAIN_END - TRAIN_START) * update.step / update.total_steps
        progress(TuneUpdate("train", fraction, update.message, update))

    trainer = Trainer(trained, data, settings, snapshots, pad_token_id(loaded.tokenizer), report, objective,
                      keep_zeros=zeros if settings.full else None, before_step=before_step)
    return trained, trainer.run()


def _heldout_loss(model: PreTrainedModel, data: TuneData, settings: TuneSettings, tokenizer, ranks: Ranks = ONE_PROCESS) -> float:
    return validation_loss(model, data.heldout, settings.batch_size, pad_token_id(tokenizer), ranks)


def _publish(
    loaded: LoadedModel, trained: PeftModel | PreTrainedModel, data: TuneData, settings: TuneSettings,
    training: TrainingResult, dtype: torch.dtype, out_dir: Path | None, heldout_before: float, zeros: ZeroPattern | None,
    teacher: LoadedModel | None, store: ArtifactStore,
) -> dict[str, Any]:
    """Save the adapter (LoRA), fold it in, check the model, store both."""
    state = training.state
    before = state.curve[0].val_loss
    staging = Path(tempfile.mkdtemp(prefix="prunelab-tune-"))
    target = Path(out_dir) if out_dir is not None else staging / "checkpoint"
    adapter_dir = None if settings.full else staging / "adapter"
    try:
        if adapter_dir is not None:
            trained.peft_config["default"].base_model_name_or_path = loaded.source.spec
            trained.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)
        merged, after, best_step, reason = _merged_model(loaded, trained, data, settings, training, dtype, zeros)
        summary = {
            "best_step": best_step, "reason": reason,
            "val_ppl_before": perplexity_of(before), "val_ppl_after": perplexity_of(after),
            "heldout_ppl_before": perplexity_of(heldout_before),
            "heldout_ppl_after": perplexity_of(_heldout_loss(merged, data, settings, loaded.tokenizer)),
        }
        record = _provenance(loaded, merged, data, settings, training, dtype, summary, teacher)
        save_checkpoint(merged, loaded.tokenizer, target, record)
        meta = {"base_model": record["base_model_id"], "method": record["method"], "objective": settings.objective,
                "input_sha256": loaded.source.sha256, **summary}
        artifact = store.put_dir(target, kind="model", meta=meta)
        adapter = None
        if adapter_dir is not None:
            (adapter_dir / "prunelab.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            adapter = store.put_dir(adapter_dir, kind="adapter", meta=meta)
    except BaseException:
        if out_dir is not None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"artifact": artifact, "adapter": adapter, "checkpoint_dir": None if out_dir is None else target, **summary}


def _merged_model(
    loaded: LoadedModel, trained: PeftModel | PreTrainedModel, data: TuneData, settings: TuneSettings,
    training: TrainingResult, dtype: torch.dtype, zeros: ZeroPattern | None,
) -> tuple[PreTrainedModel, float, int, str]:
    """The input with the best adapter folded in (a sparse input's zeros set again), or
    the best fully trained weights; its validation loss, the step it is, and why. At
    step 0 the adapter is zero and the fold exact. Later steps are measured again once
    folded: in bf16 the fold rounds, the zeros drop part of the update, and should that
    leave the model worse than the input, the input itself is returned."""
    state = training.state
    merged = trained.requires_grad_(False) if settings.full else trained.merge_and_unload()
    if zeros is not None:
        zeros.restore(merged)  # before measuring: the guard judges the model that is returned
    before = state.curve[0].val_loss
    if state.best_step == 0:
        return merged, before, 0, training.reason
    after = validation_loss(merged, data.validation, settings.batch_size, pad_token_id(loaded.tokenizer))
    if math.isfinite(after) and after <= before:
        return merged, after, state.best_step, training.reason
    folded = f"folded into the {str(dtype).removeprefix('torch.')} weights" + (", zeros kept," if zeros is not None else "")
    reason = (
        f"step 0: step {state.best_step}'s adapter {folded} measured "
        f"val ppl {perplexity_of(after):.3f}, above the input's {perplexity_of(before):.3f} ({training.reason})"
    )
    log.warning("%s; returning the input model", reason)
    return load_model(loaded.source.spec, dtype=dtype, device=loaded.model.device).model, before, 0, reason


def _provenance(
    loaded: LoadedModel, merged: PreTrainedModel, data: TuneData, settings: TuneSettings, training: TrainingResult,
    dtype: torch.dtype, summary: dict[str, Any], teacher: LoadedModel | None,
) -> dict[str, Any]:
    source = loaded.source
    parent = read_provenance(source.path)
    return {
        "base_model_id": source.base_id,
        "base_model_sha256": parent.get("base_model_sha256", source.sha256),
        "method": settings.trained,
        "objective": settings.objective,
        "teacher": _teacher_record(teacher),
        "tokens_seen": training.state.tokens_seen,
        "settings": settings.as_dict(),
        "seed": settings.seed,
        "precision": str(dtype).removeprefix("torch."),
        "input_model": {
            "spec": source.spec, "kind": source.kind, "sha256": source.sha256,
            "uri": source.spec if source.kind == "artifact" else "",
        },
        "data": data.identity,
        **summary,
        "stop": training.state.stop,
        "steps_run": training.state.step,
        "total_steps": training.total_steps,
        "curve": [asdict(point) for point in training.state.curve],
        "input_provenance": parent,
        **sparsity_record(parent, merged),
    }
