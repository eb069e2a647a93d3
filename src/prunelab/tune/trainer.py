"""The training loop (LoRA or full parameters, any objective.py objective) and the
guard that keeps it from returning a worse model.

Validation loss (mean NLL per scored token, whatever the training objective;
perplexity is its exp) is measured at
step 0, every `eval_every` steps and at the last step. The adapter of the best
evaluation is kept, step 0 (the input model: LoRA's B matrices start at zero,
full training starts from the input's weights) included, so the result is never worse on validation than the input. Training
stops early after `patience` evaluations without improvement, and at once on a
non-finite training loss, gradient norm or validation loss; the best state is what
is returned either way.

Each evaluation also writes a snapshot (see state.py); a run that finds one for the
same job resumes from it. The data order is a function of the step (seeded
permutations per epoch), and the torch RNG state (LoRA dropout) is saved, so a
resumed run takes the same steps an uninterrupted one would.

The best state is kept on the CPU: for full-parameter training it is a copy of the
whole model, which an accelerator should not hold twice.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.errors import FailedPrecondition
from prunelab.tune.data import IGNORE_INDEX, Example, TuneData, collate
from prunelab.tune.objective import Objective, shifted_logits, summed_nll
from prunelab.tune.ranks import ONE_PROCESS, Ranks
from prunelab.tune.settings import TuneSettings
from prunelab.tune.sparsity import ZeroPattern
from prunelab.tune.state import CurvePoint, JobDirectory, TrainingState

# Called with (the step about to be taken, 1-based, and the model) before its
# forward passes. For tests and diagnostics, e.g. registering a forward hook that
# injects a NaN at a chosen step to exercise the guard; training never needs it.
BeforeStep = Callable[[int, nn.Module], None]


@dataclass(frozen=True)
class TrainingProgress:
    step: int
    total_steps: int
    train_loss: float | None  # of this step; None for the step-0 evaluation
    val_loss: float | None  # set when this step was evaluated
    val_ppl: float | None
    learning_rate: float
    eta_seconds: float | None
    message: str


@dataclass(frozen=True)
class TrainingResult:
    state: TrainingState
    total_steps: int
    resumed_from_step: int | None  # the snapshot's step when this run resumed one
    reason: str  # which step won and why
    optimizer_bytes: int  # AdamW's moments at the end


def learning_rate(settings: TuneSettings, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (1-based): linear warmup to `lr`
    over `warmup_steps`, then constant, linear decay or cosine decay towards zero."""
    if step <= settings.warmup_steps:
        return settings.lr * step / settings.warmup_steps
    progress = (step - settings.warmup_steps - 1) / max(1, total_steps - settings.warmup_steps)
    if settings.schedule == "linear":
        return settings.lr * (1.0 - progress)
    if settings.schedule == "cosine":
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.lr


def perplexity_of(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a double past ~709


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _not_finite_word(value: float) -> str:
    return "nan" if math.isnan(value) else "inf"


def _non_finite(values: dict[str, float]) -> str:
    """"nan loss", "inf gradient norm", ...: the first of `values` that is not finite; "" if all are."""
    for name, value in values.items():
        if not math.isfinite(value):
            return f"{_not_finite_word(value)} {name}"
    return ""


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def labelled_tokens(examples: list[Example]) -> int:
    """The positions of `examples` that carry a loss (every labelled token but each example's first)."""
    return sum(int((example.labels[1:] != IGNORE_INDEX).sum()) for example in examples)


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, ranks: Ranks = ONE_PROCESS) -> float:
    """Mean NLL per scored token over `examples`, in eval mode (no dropout); with
    several ranks each scores its share and the sums are reduced (every rank must call)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = ranks.share(examples)
    total = 0.0
    try:
        for start in range(0, len(mine), batch_size):
            batch = {k: v.to(device) for k, v in collate(mine[start : start + batch_size], pad_id).items()}
            total += summed_nll(*shifted_logits(model, batch)).item()
    finally:
        model.train(was_training)
    total, tokens = ranks.sum(total, labelled_tokens(mine))
    return total / tokens


class MicroBatches:
    """Micro-batch `index` of the training stream: epoch after epoch of seeded
    permutations, so where the data stands after any step needs no saving."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = max(1, len(examples) // batch_size)  # the len % batch_size examples a permutation puts last sit that epoch out
        self._order: tuple[int, torch.Tensor] | None = None

    def __getitem__(self, index: int) -> list[Example]:
        epoch, position = divmod(index, self.per_epoch)
        chosen = self._epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        return [self.examples[i] for i in chosen.tolist()]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            digest = hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            self._order = (epoch, torch.randperm(len(self.examples), generator=generator))
        return self._order[1]


class Trainer:
    """Trains the parameters of `model` that require gradients (LoRA's, or all of
    them) on `objective`. `keep_zeros`: set these zeros again after every update, so a
    sparse model trained in full stays sparse (masked updates). Under torchrun every
    rank runs one (ranks.py); rank 0 alone saves snapshots and reports."""

    def __init__(
        self,
        model: nn.Module,
        data: TuneData,
        settings: TuneSettings,
        snapshots: JobDirectory,
        pad_id: int,
        report: Callable[[TrainingProgress], None],
        objective: Objective,
        keep_zeros: ZeroPattern | None = None,
        before_step: BeforeStep | None = None,
    ):
        self.model = model
        self.data = data
        self.settings = settings
        self.snapshots = snapshots
        self.pad_id = pad_id
        self.report = report
        self.objective = objective
        self.keep_zeros = keep_zeros
        self.before_step = before_step
        self.ranks = Ranks.current()
        self.total_steps = settings.total_steps(len(data.train))
        self.device = next(model.parameters()).device
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.batches = MicroBatches(data.train, settings.batch_size, settings.seed)
        self.best: dict[str, torch.Tensor] = {}

    def run(self) -> TrainingResult:
        """Train until done, stopped early or stopped by a non-finite value; the
        model's LoRA parameters are then the best evaluated ones."""
        state, resumed_from = self._resume_or_start()
        started, first_step = time.perf_counter(), state.step
        since_evaluation: list[float] = []
        while not state.stop:
            if self.before_step is not None:
                self.before_step(state.step + 1, self.model)
            loss, grad_norm, tokens = self._train_step(state.step)
            state.step += 1
            state.tokens_seen += tokens
            problem = _non_finite({"loss": loss, "gradient norm": grad_norm})
            if problem:
                state.stop, state.stop_detail = "non_finite", f"{problem} at step {state.step}"
                self._save(state)
                break
            since_evaluation.append(loss)
            evaluated = state.step % self.settings.eval_every == 0 or state.step == self.total_steps
            if evaluated:
                self._evaluate(state, sum(since_evaluation) / len(since_evaluation))
                since_evaluation = []
                self._save(state)
            eta = (time.perf_counter() - started) / (state.step - first_step) * (self.total_steps - state.step)
            self._report(state, loss, evaluated, eta)
        self._load_parameters(self.best)
        return TrainingResult(state, self.total_steps, resumed_from, describe(state, self.total_steps, self.settings.patience),
                              self._optimizer_bytes())

    # ---- one step, one evaluation ----

    def _train_step(self, step_index: int) -> tuple[float, float, int]:
        """One optimizer step (grad_accum micro-batches, weighted by their labelled
        tokens); its mean loss per token, gradient norm and labelled tokens. No update
        is applied when the loss or the norm is not finite."""
        rate = learning_rate(self.settings, step_index + 1, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        accumulation = self.settings.grad_accum
        micro_batches = [self.batches[step_index * accumulation + i] for i in range(accumulation)]
        tokens = sum(labelled_tokens(examples) for examples in micro_batches)  # over all ranks
        self.model.train()
        total = 0.0
        for examples in micro_batches:
            mine = self.ranks.share(examples)
            if mine:
                loss = self.objective(self.model, {k: v.to(self.device) for k, v in collate(mine, self.pad_id).items()})
                (loss / tokens).backward()
                total += loss.item()
        self.ranks.sum_gradients(list(self.params.values()))
        [total] = self.ranks.sum(total)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params.values(), self.settings.max_grad_norm))
        if math.isfinite(total) and math.isfinite(grad_norm):
            self.optimizer.step()
            if self.keep_zeros is not None:
                self.keep_zeros.restore(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return total / tokens, grad_norm, tokens

    def _evaluate(self, state: TrainingState, train_loss: float | None) -> None:
        loss = validation_loss(self.model, self.data.validation, self.settings.batch_size, self.pad_id, self.ranks)
        state.curve.append(CurvePoint(state.step, _finite_or_none(train_loss), _finite_or_none(loss), _finite_or_none(perplexity_of(loss))))
        if not math.isfinite(loss):
            if state.step == 0:
                raise FailedPrecondition(f"the input model's validation loss is {loss}; there is nothing to guard", field="model")
            state.stop, state.stop_detail = "non_finite", f"{_not_finite_word(loss)} validation loss at step {state.step}"
            return
        if state.best_val_loss is None or loss < state.best_val_loss:
            state.best_step, state.best_val_loss, state.evaluations_since_best = state.step, loss, 0
            self.best = {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}
        else:
            state.evaluations_since_best += 1
        if self.settings.patience and state.evaluations_since_best >= self.settings.patience:
            state.stop = "early_stop"
        elif state.step >= self.total_steps:
            state.stop = "completed"

    def _report(self, state: TrainingState, train_loss: float | None, evaluated: bool, eta: float | None) -> None:
        if not self.ranks.main:
            return
        point = state.curve[-1] if evaluated else None
        rate = learning_rate(self.settings, max(state.step, 1), self.total_steps)
        message = f"step {state.step}/{self.total_steps}"
        if train_loss is not None:
            message += f" loss {train_loss:.4f}"
        if point is not None:
            message += f" val ppl {point.val_ppl:.3f}" if point.val_ppl is not None else " val ppl not finite"
        self.report(TrainingProgress(
            state.step, self.total_steps, train_loss, point.val_loss if point else None, point.val_ppl if point else None,
            rate, eta, message,
        ))

    def _optimizer_bytes(self) -> int:
        return tensor_bytes(t for entries in self.optimizer.state.values() for t in entries.values() if torch.is_tensor(t))

    # ---- snapshots ----

    def _resume_or_start(self) -> tuple[TrainingState, int | None]:
        snapshot = self.snapshots.load_latest()
        self.ranks.barrier()  # every rank has read before rank 0 may write the first snapshot
        if snapshot is None:
            state = TrainingState()
            self._evaluate(state, None)
            self._save(state)
            self._report(state, None, True, None)
            return state, None
        record, tensors = snapshot
        state = TrainingState.from_json(record["state"])
        if set(tensors["trained"]) != set(self.params):
            raise FailedPrecondition(f"the snapshot in {self.snapshots.path} holds other trained parameters than this model has")
        self._load_parameters(tensors["trained"])
        self.best = tensors["best"]
        self._load_optimizer(tensors["optimizer"], record["optimizer_param_groups"])
        torch.set_rng_state(tensors["rng"]["cpu"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng"]["cuda"], self.device)
        return state, state.step

    def _save(self, state: TrainingState) -> None:
        if not self.ranks.main:
            return
        optimizer_state = self.optimizer.state_dict()
        moments = {f"{index}.{key}": value for index, entries in optimizer_state["state"].items() for key, value in entries.items()}
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        record = {
            "state": state.as_json(),
            "micro_batches_done": state.step * self.settings.grad_accum,  # the data position (see MicroBatches)
            "seed": self.settings.seed,
            "settings": self.settings.as_dict(),
            "optimizer_param_groups": optimizer_state["param_groups"],
        }
        tensors = {"trained": dict(self.params), "best": self.best, "optimizer": moments, "rng": rng}
        self.snapshots.save(record, tensors)

    def _load_parameters(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(values[name])

    def _load_optimizer(self, moments: dict[str, torch.Tensor], groups: list[dict]) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in moments.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value.to(self.device) if name != "step" else value
        for group in groups:
            group["betas"] = tuple(group["betas"])
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


def describe(state: TrainingState, total_steps: int, patience: int) -> str:
    """Which step won and why, in one line."""
    if state.stop == "non_finite":
        return f"{state.stop_detail}; kept step {state.best_step}"
    evaluations = len(state.curve)
    if state.best_step == 0:
        winner = "step 0: no evaluated step improved validation perplexity"
    else:
        winner = f"step {state.best_step}: best of {evaluations} evaluations"
    if state.stop == "early_stop":
        return f"{winner}; stopped early after {patience} without improvement"
    return f"{winner}; ran all {total_steps} steps"
