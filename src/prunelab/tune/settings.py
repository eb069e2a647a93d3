"""What a tuning job is asked to do, checked before any work starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from prunelab.data import canonical_split
from prunelab.errors import InvalidArgument
from prunelab.limits import check_limit

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("constant", "cosine", "linear")
# "auto": bf16 on GPUs that support it, else fp32. fp16 is refused: its narrow range
# is where LLM-Pruner users see NaN losses, and bf16 has fp32's range.
PRECISIONS = ("auto", "bf16", "fp32")
OBJECTIVES = ("ce", "kd", "kd+ce")  # next-token loss, distillation, both (objective.py)


@dataclass(frozen=True)
class TuneSettings:
    """Everything that decides the tuned model apart from the input model.

    Defaults follow LLM-Pruner's post-training (LoRA rank 8, alpha 16, dropout 0.05,
    lr 1e-4, 256 tokens, next-token loss), with validation every `eval_every` steps.
    """

    data: str  # registry dataset: alpaca instruction set or text corpus
    data_split: str = "train"
    val_data: str = ""  # "" = hold out the last `val_fraction` of `data`
    val_split: str = "validation"  # of val_data
    val_fraction: float = 0.1
    # The last `heldout_fraction` of the validation examples never choose the step:
    # scored on the input and on the returned model only, an unbiased "after".
    heldout_fraction: float = 0.5
    max_val_examples: int = 64  # validation cost per evaluation is bounded by this (and so is the held-out part)
    rank: int = 8
    alpha: float | None = None  # None = 2 x rank
    dropout: float = 0.05
    target_modules: tuple[str, ...] = PROJECTIONS
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    steps: int | None = None  # optimizer steps; None = `epochs` passes over the training examples
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256  # tokens per example (text windows are exactly this long)
    seed: int = 0
    eval_every: int = 50
    patience: int = 3  # evaluations without improvement before stopping; 0 = never stop early
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    precision: str = "auto"
    # What is trained, on what loss (objective.py): LoRA adapters (rank, alpha, dropout,
    # target_modules) or, with `full`, every parameter; ce, kd or kd+ce.
    full: bool = False
    objective: str = "ce"
    teacher: str = ""  # kd's teacher: "" = the unpruned model the input was pruned from (its provenance)
    temperature: float = 1.0  # kd's softening of both distributions
    kd_weight: float = 0.5  # kd+ce: kd_weight * kd + (1 - kd_weight) * ce

    @property
    def trained(self) -> str:
        """What trains: "lora" (the adapters) or "full" (every parameter)."""
        return "full" if self.full else "lora"

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    def as_dict(self) -> dict:
        """JSON-ready, with the alpha actually used."""
        return {**asdict(self), "target_modules": list(self.target_modules), "alpha": self.lora_alpha}

    def validate(self) -> None:
        if not isinstance(self.data, str) or not self.data.strip():
            raise InvalidArgument("name the dataset to tune on", field="data")
        for name in ("data_split", "val_split"):
            try:
                canonical_split(getattr(self, name))
            except InvalidArgument as error:
                raise InvalidArgument(error.reason, field=name) from None
        self._check_positive_ints()
        self._check_positive_numbers()
        for name, value in (("warmup_steps", self.warmup_steps), ("patience", self.patience), ("seed", self.seed)):
            if not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{name} must be a non-negative integer, got {value!r}", field=name)
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidArgument(f"dropout must be in [0, 1), got {self.dropout}", field="dropout")
        if self.val_data == self.data and canonical_split(self.val_split) == canonical_split(self.data_split):
            raise InvalidArgument("val_data names the training split itself; validate on another split or dataset", field="val_data")
        for name in ("val_fraction", "heldout_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise InvalidArgument(f"{name} must be in (0, 1), got {getattr(self, name)}", field=name)
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise InvalidArgument(f"weight_decay must be >= 0, got {self.weight_decay}", field="weight_decay")
        self._check_choices()
        self._check_target_modules()
        self._check_objective()

    def _check_positive_ints(self) -> None:
        for name in ("rank", "batch_size", "grad_accum", "eval_every", "max_val_examples", "steps"):
            value = getattr(self, name)
            if name == "steps" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be a positive integer, got {value!r}", field=name)
        if self.max_length < 2:
            raise InvalidArgument(f"max_length must be at least 2 (a token and the next), got {self.max_length}", field="max_length")
        for name, kind in (("rank", "rank"), ("batch_size", "batch_size"), ("grad_accum", "batch_size"), ("eval_every", "steps"),
                           ("max_val_examples", "samples"), ("steps", "steps"), ("epochs", "steps"), ("max_length", "seq_len")):
            if getattr(self, name) is not None:
                check_limit(kind, getattr(self, name), name)

    def _check_positive_numbers(self) -> None:
        for name in ("lr", "epochs", "alpha", "max_grad_norm", "temperature"):
            value = getattr(self, name)
            if name == "alpha" and value is None:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidArgument(f"{name} must be a positive number, got {value!r}", field=name)

    def _check_choices(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InvalidArgument(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}", field="schedule")
        if self.precision in ("fp16", "float16"):
            raise InvalidArgument("fp16 overflows in training (NaN losses); use bf16 or fp32", field="precision")
        if self.precision not in PRECISIONS:
            raise InvalidArgument(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}", field="precision")

    def _check_target_modules(self) -> None:
        unknown = [m for m in self.target_modules if m not in PROJECTIONS]
        if unknown:
            raise InvalidArgument(
                f"unknown target module(s) {', '.join(map(repr, unknown))}; choose from {', '.join(PROJECTIONS)}",
                field="target_modules",
            )
        if not self.target_modules or len(set(self.target_modules)) != len(self.target_modules):
            raise InvalidArgument("target_modules must name each projection at most once, and at least one", field="target_modules")

    def _check_objective(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InvalidArgument(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}", field="objective")
        if not isinstance(self.full, bool):
            raise InvalidArgument(f"full must be true or false, got {self.full!r}", field="full")
        if not isinstance(self.teacher, str):
            raise InvalidArgument(f"teacher must be a model name, got {self.teacher!r}", field="teacher")
        if self.objective == "ce" and self.teacher.strip():
            raise InvalidArgument("a teacher is only used by the kd objectives (kd, kd+ce)", field="teacher")
        if not isinstance(self.kd_weight, (int, float)) or not 0.0 < self.kd_weight < 1.0:
            raise InvalidArgument(f"kd_weight must be in (0, 1), got {self.kd_weight!r}", field="kd_weight")

    def total_steps(self, train_examples: int) -> int:
        """Optimizer steps: `steps`, or `epochs` passes over `train_examples`."""
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil(self.epochs * train_examples / per_step))


def training_dtype(precision: str, device: str) -> torch.dtype:
    """bf16 where asked, or on "auto" where the GPU supports it; fp32 otherwise
    (CPUs lack fast bf16 matmuls)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
