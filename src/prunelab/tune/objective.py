"""What a tuning step minimises: next-token cross-entropy, distillation from a teacher, or both.

`kd` is Hinton et al.'s logit distillation as Minitron recovers pruned models with it:
at every labelled position, the KL divergence from the teacher's next-token
distribution to the student's, both softened by a temperature T and scaled by T^2 so
the gradient's size does not shrink as T grows. `kd+ce` weighs the two,
kd_weight * kd + (1 - kd_weight) * ce. torch has the KL term (F.kl_div); the
masking, shifting and weighting are written here because transformers' and peft's
trainers have no teacher.

The teacher runs in eval mode under no_grad in the student's dtype and device, on the
same batch, one forward pass per micro-batch: its logits are never stored, so the
cost of distillation is that pass and the teacher's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.tune.data import IGNORE_INDEX
from prunelab.tune.settings import OBJECTIVES


def shifted_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits of every position but the last, and the labels they predict."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits[:, :-1].float(), batch["labels"][:, 1:]  # position t predicts token t + 1


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over the labelled positions."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def summed_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), summed over the labelled positions."""
    labelled = targets != IGNORE_INDEX
    student = F.log_softmax(student_logits[labelled] / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[labelled] / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature**2


class Objective:
    """The training loss of one micro-batch: summed over its labelled positions (the
    trainer divides by the step's labelled tokens)."""

    def __init__(self, kind: str, teacher: nn.Module | None = None, temperature: float = 1.0, kd_weight: float = 0.5):
        if kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {kind!r}")
        if (kind != "ce") != (teacher is not None):
            raise ValueError(f"objective {kind!r} {'needs' if kind != 'ce' else 'takes no'} teacher")
        self.teacher = teacher
        self.temperature = temperature
        self.kd_weight = {"ce": 0.0, "kd": 1.0, "kd+ce": kd_weight}[kind]

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, targets = shifted_logits(model, batch)
        loss = torch.zeros((), device=logits.device)
        if self.kd_weight < 1.0:
            loss = loss + (1.0 - self.kd_weight) * summed_nll(logits, targets)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits, _ = shifted_logits(self.teacher, batch)
            loss = loss + self.kd_weight * summed_kd(logits, teacher_logits, targets, self.temperature)
        return loss
