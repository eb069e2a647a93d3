"""Importance of every prunable group, by LLM-Pruner's criteria.

A *group* is what is removed together: one KV group of an attention layer (its
k and v rows, the rows of the query heads that share it, and those heads'
o_proj columns), or one MLP channel (its gate and up rows and down column).

Element salience, as LLM-Pruner defines it (`hf_llama_pruner.TaylorImportance`,
`MagnitudeImportance`), with G the gradient of the calibration loss and F the
mean of per-sample squared gradients (a diagonal Fisher / Hessian estimate):
  l1: |W|          l2: W^2          random: a seeded uniform score per group
  taylor element1: |W G|            (first order, LLM-Pruner's param_first)
  taylor element2: |W F W| / 2      (second order, param_second)
  taylor mix:      |-W G + W F W / 2|  (param_mix)
  taylor vector:   |sum over the module's slice of W G|  (vectorize)
The salience of a module's slice is summed; the slices of a group's modules are
then aggregated by `aggregation` (sum, mean, max, or first: the root module only,
k_proj for attention and gate_proj for the MLP, as LLM-Pruner's roots).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.errors import InvalidArgument

CRITERIA = ("taylor", "l1", "l2", "random")
TAYLOR_VARIANTS = ("vector", "element1", "element2", "mix")
AGGREGATIONS = ("sum", "mean", "max", "first")


@dataclass(frozen=True)
class Criterion:
    method: str  # one of CRITERIA
    variant: str = "element1"  # taylor only
    aggregation: str = "sum"

    def __post_init__(self) -> None:
        if self.method not in CRITERIA:
            raise InvalidArgument(f"unknown method {self.method!r}; choose one of {', '.join(CRITERIA)}", field="method")
        if self.method == "taylor" and self.variant not in TAYLOR_VARIANTS:
            raise InvalidArgument(
                f"unknown taylor variant {self.variant!r}; choose one of {', '.join(TAYLOR_VARIANTS)}", field="variant"
            )
        if self.aggregation not in AGGREGATIONS:
            raise InvalidArgument(
                f"unknown aggregation {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}", field="aggregation"
            )

    @property
    def needs_gradients(self) -> bool:
        return self.method == "taylor"

    @property
    def needs_fisher(self) -> bool:
        return self.method == "taylor" and self.variant in ("element2", "mix")


# (weight, grad, fisher) -> salience tensor of the weight's shape, or None for
# "vector", whose slice sum is signed and taken absolute after slicing. Each makes
# one new tensor of the weight's size (two for mix) and works in place on it: the
# Taylor hooks run one per parameter, and their temporaries are the pass's peak.
ElementSalience = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]

_SALIENCE: dict[tuple[str, str], ElementSalience] = {
    ("l1", ""): lambda w, g, f: w.abs(),
    ("l2", ""): lambda w, g, f: w.pow(2),
    ("taylor", "element1"): lambda w, g, f: (w * g).abs_(),
    ("taylor", "element2"): lambda w, g, f: (w * w).mul_(f).mul_(0.5).abs_(),
    ("taylor", "mix"): lambda w, g, f: (w * w).mul_(f).mul_(0.5).sub_(w * g).abs_(),
    ("taylor", "vector"): lambda w, g, f: w * g,
}


def salience_fn(criterion: Criterion) -> ElementSalience:
    variant = criterion.variant if criterion.method == "taylor" else ""
    return _SALIENCE[(criterion.method, variant)]


@dataclass
class Slice:
    """One module's share of every group in a layer: its parameter, the axis
    that indexes groups, and how many consecutive rows/columns make one group."""

    param: nn.Parameter
    axis: int  # 0: output rows, 1: input columns
    span: int  # rows or columns per group


def slice_scores(item: Slice, salience: ElementSalience, signed_then_abs: bool,
                 grad: torch.Tensor | None = None, fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group score of one module slice, float32: shape (groups,). `grad` and
    `fisher` are the slice parameter's gradient and Fisher term (Taylor only)."""
    s = salience(item.param.detach(), grad, fisher)
    wide = torch.promote_types(s.dtype, torch.float32)  # bf16 sums would drop small groups' mass
    # the axis that does not index groups is summed first: no transposed copy
    per_index = s.sum(dim=1 - item.axis, dtype=wide) if s.dim() == 2 else s.to(wide)  # a bias: one per output row
    per_group = per_index.reshape(-1, item.span).sum(dim=1)
    return (per_group.abs() if signed_then_abs else per_group).float()


def aggregate(scores: list[torch.Tensor], how: str) -> torch.Tensor:
    stacked = torch.stack(scores)
    if how == "first":
        return stacked[0]
    if how == "max":
        return stacked.max(dim=0).values
    if how == "mean":
        return stacked.mean(dim=0)
    return stacked.sum(dim=0)


def attention_slices(attn: nn.Module, head_dim: int, queries_per_group: int) -> list[Slice]:
    """k first: LLM-Pruner's attention root (llama3.py) for `first` aggregation."""
    q_span = queries_per_group * head_dim
    slices = [Slice(attn.k_proj.weight, 0, head_dim), Slice(attn.q_proj.weight, 0, q_span),
              Slice(attn.v_proj.weight, 0, head_dim), Slice(attn.o_proj.weight, 1, q_span)]
    for name, span in (("k_proj", head_dim), ("q_proj", q_span), ("v_proj", head_dim)):
        bias = getattr(attn, name).bias
        if bias is not None:
            slices.append(Slice(bias, 0, span))
    return slices


def mlp_slices(mlp: nn.Module) -> list[Slice]:
    """gate first: LLM-Pruner's MLP root."""
    return [Slice(mlp.gate_proj.weight, 0, 1), Slice(mlp.up_proj.weight, 0, 1), Slice(mlp.down_proj.weight, 1, 1)]


def group_scores(slices: list[Slice], criterion: Criterion, n_groups: int, generator: torch.Generator) -> torch.Tensor:
    """Importance of each of a layer block's `n_groups` groups (higher = keep) by a
    criterion that reads only the weights; Taylor's needs the calibration gradients
    (calibration.taylor_group_scores)."""
    if criterion.needs_gradients:
        raise ValueError("taylor scores come from calibration.taylor_group_scores")
    if criterion.method == "random":
        return torch.rand(n_groups, generator=generator)
    salience = salience_fn(criterion)
    return aggregate([slice_scores(s, salience, False) for s in slices], criterion.aggregation)
