"""Structured pruning that reads activations, applied layer by layer.

FLAP's criteria (An et al., 2024) score the input columns of o_proj and down_proj
(one KV group's query heads, or one MLP channel) from calibration activations x:
  flap:     Var(x_j) * ||W[:, j]||^2   (the "fluctuation" of the column's output)
  wanda-sp: sum_i |W_ij| * ||x_j||      (Wanda's score summed over the column)
The adaptive allocation standardises those scores per module type across layers
and removes the globally lowest, as FLAP does, so every layer gets its own width.

Whatever the criterion, removal runs layer by layer (sequential.py): each layer's
o_proj and down_proj are measured on inputs that already went through the pruned
layers before it, its units are chosen (activation criteria) or looked up (weight
and gradient criteria), and the projection makes up for the lost inputs: a ridge
least-squares refit whose ridge is measured per projection, or FLAP's bias.
Written here because no library prunes Llama structurally this way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from prunelab.models import LlamaFamilyAdapter
from prunelab.models.adapter import expand_units
from prunelab.prune.correction import bias_compensation, measured_damping, refit_kept_columns
from prunelab.prune.sequential import LayerPass, LayerStatistics, layer_by_layer
from prunelab.prune.targets import LayerShape, RemovalPlan

ACTIVATION_CRITERIA = ("flap", "wanda-sp")
# The adaptive allocation leaves every layer at least this share of its MLP
# channels (and one KV group): no layer is emptied.
MIN_KEPT_SHARE = 0.05

Key = tuple[int, str]  # (layer, "kv_groups" | "mlp_channels")
# What prune_sequentially asks to choose a block's units: (key, the projection's
# weight, its input statistics, their name, input columns per unit) -> a score per
# unit, higher = keep.
UnitScorer = Callable[[Key, torch.Tensor, LayerStatistics, str, int], torch.Tensor]


def column_scores(criterion: str, weight: torch.Tensor, stats: LayerStatistics, name: str) -> torch.Tensor:
    """Per input column of `weight` (out, d): FLAP's fluctuation or wanda-sp."""
    w = weight.detach().float()
    squares = _diagonal(stats.of(name)) / stats.tokens(name)  # E[x_j^2]
    if criterion == "flap":
        variance = (squares - stats.mean(name).pow(2)).clamp_min(0)
        return variance * w.pow(2).sum(0)
    return w.abs().sum(0) * squares.sqrt()


def unit_scores(criterion: str, weight: torch.Tensor, stats: LayerStatistics, name: str, span: int) -> torch.Tensor:
    """Column scores summed over each unit of `span` consecutive columns."""
    return column_scores(criterion, weight, stats, name).reshape(-1, span).sum(1)


def _diagonal(statistic: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(statistic) if statistic.dim() == 2 else statistic


def activation_scores(model: nn.Module, windows: torch.Tensor, criterion: str, keys: list[Key]) -> dict[Key, torch.Tensor]:
    """One pass of the unpruned model, layer by layer: the scores of every unit in `keys`."""
    adapter = LlamaFamilyAdapter(model)
    wanted = set(keys)
    scores: dict[Key, torch.Tensor] = {}

    def measure(index: int, _layer: nn.Module, layer_pass: LayerPass) -> None:
        proj = adapter.projections(index)
        linears = {name: linear for name, linear, kind in (("o", proj.o, "kv_groups"), ("down", proj.down, "mlp_channels"))
                   if (index, kind) in wanted}
        if not linears:
            return
        stats = layer_pass.statistics(linears, gram=False)
        for name, linear in linears.items():
            kind = "kv_groups" if name == "o" else "mlp_channels"
            scores[(index, kind)] = unit_scores(criterion, linear.weight, stats, name, _span(adapter, index, kind))

    layer_by_layer(model, windows, measure)
    return scores


def _span(adapter: LlamaFamilyAdapter, layer: int, kind: str) -> int:
    """Input columns of o_proj / down_proj per unit: a KV group's query heads, or 1."""
    if kind == "mlp_channels":
        return 1
    widths = adapter.layer_widths()[layer]
    return widths.num_attention_heads // widths.num_key_value_heads * adapter.head_dim


def adaptive_plan(scores: dict[Key, torch.Tensor], shapes: list[LayerShape], target: int) -> RemovalPlan:
    """FLAP's allocation: each module type's scores standardised across layers (so
    attention and MLP scores compare), then the globally lowest units go until
    `target` parameters are removed; every layer keeps one KV group and
    MIN_KEPT_SHARE of its channels."""
    standardised = []  # (z, layer, kind)
    for kind in ("kv_groups", "mlp_channels"):
        keys = [key for key in scores if key[1] == kind]
        if not keys:
            continue
        every = torch.cat([scores[key].float() for key in keys])
        mean, std = every.mean(), every.std().clamp_min(1e-12) if every.numel() > 1 else torch.tensor(1.0)
        standardised += [(float(z), i, kind) for (i, _) in keys for z in (scores[(i, kind)].float() - mean) / std]
    standardised.sort(key=lambda unit: unit[0])
    removed = {"kv_groups": [0] * len(shapes), "mlp_channels": [0] * len(shapes)}
    done = 0
    for _, i, kind in standardised:
        params = shapes[i].group_params if kind == "kv_groups" else shapes[i].channel_params
        if done + params > target + shapes[i].channel_params / 2:
            continue
        width = shapes[i].kv_groups if kind == "kv_groups" else shapes[i].mlp_channels
        floor = 1 if kind == "kv_groups" else max(1, math.ceil(MIN_KEPT_SHARE * width))
        if removed[kind][i] + floor < width:
            removed[kind][i] += 1
            done += params
    return RemovalPlan(removed["kv_groups"], removed["mlp_channels"])


def prune_sequentially(model: nn.Module, windows: torch.Tensor, plan: RemovalPlan, score: UnitScorer,
                       correction: str, on_layer: Callable[[int, int], None] = lambda index, layers: None) -> dict[int, dict[str, list[int]]]:
    """Remove what `plan` says from every layer in turn, keeping the units `score`
    ranks highest, each projection corrected as `correction` says (refit, bias,
    none) on its inputs from the already pruned layers. Returns the kept units."""
    adapter = LlamaFamilyAdapter(model)
    kept: dict[int, dict[str, list[int]]] = {}

    def prune_layer(index: int, _layer: nn.Module, layer_pass: LayerPass) -> None:
        proj = adapter.projections(index)
        # Attention first: its removal changes what reaches the MLP, so the MLP is measured after it.
        for kind, name, linear, remove in (("kv_groups", "o", proj.o, plan.kv_groups[index]),
                                           ("mlp_channels", "down", proj.down, plan.mlp_channels[index])):
            if remove:
                units = _prune_block(adapter, index, kind, name, linear, remove, layer_pass, score, correction)
                kept.setdefault(index, {})[kind] = units
        on_layer(index, adapter.num_layers)

    layer_by_layer(model, windows, prune_layer)
    return kept


def _prune_block(adapter: LlamaFamilyAdapter, index: int, kind: str, name: str, linear: nn.Linear, remove: int,
                 layer_pass: LayerPass, score: UnitScorer, correction: str) -> list[int]:
    stats = layer_pass.statistics({name: linear}, gram=correction == "refit", folds=2 if correction == "refit" else 1)
    span = _span(adapter, index, kind)
    scores = score((index, kind), linear.weight, stats, name, span)
    units = torch.topk(scores, scores.numel() - remove).indices.sort().values
    columns = expand_units(units, span).to(linear.weight.device)
    weight = linear.weight.detach()
    new_weight = bias = None
    if correction == "refit":
        damping = measured_damping(weight, stats.folds(name), columns)
        new_weight = refit_kept_columns(weight, stats.of(name), columns, damping)
    elif correction == "bias":
        bias = bias_compensation(weight, stats.mean(name), columns)
    stats.release(name)
    if kind == "kv_groups":
        adapter.keep_kv_groups(index, units.tolist())
    else:
        adapter.keep_mlp_channels(index, units.tolist())
    with torch.no_grad():
        if new_weight is not None:
            linear.weight.copy_(new_weight)
        if bias is not None:
            _add_bias(adapter, kind, linear, bias)
    return units.tolist()


def bias_params_to_add(adapter: LlamaFamilyAdapter, attention: bool, mlp: bool) -> int:
    """The zero biases _add_bias creates when it switches biases on for attention
    and/or the MLP: a plan that must land on a share of parameters counts them."""
    count = 0
    for i in range(adapter.num_layers):
        proj = adapter.projections(i)
        modules = ((proj.q, proj.k, proj.v, proj.o) if attention else ()) + ((proj.gate, proj.up, proj.down) if mlp else ())
        count += sum(m.out_features for m in modules if m.bias is None)
    return count


def _add_bias(adapter: LlamaFamilyAdapter, kind: str, linear: nn.Linear, bias: torch.Tensor) -> None:
    """Give `linear` a bias (added to any it has). Llama's config switches biases on
    for a whole module type at once (attention_bias: q, k, v, o; mlp_bias: gate, up,
    down), so the others of that type get zero biases: the checkpoint keeps the
    stock config and loads with plain transformers."""
    flag = "attention_bias" if kind == "kv_groups" else "mlp_bias"
    if not getattr(adapter.model.config, flag, False):
        setattr(adapter.model.config, flag, True)
        for i in range(adapter.num_layers):
            proj = adapter.projections(i)
            for module in (proj.q, proj.k, proj.v, proj.o) if kind == "kv_groups" else (proj.gate, proj.up, proj.down):
                if module.bias is None:
                    module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                           device=module.weight.device), requires_grad=False)
    linear.bias.add_(bias.to(linear.bias.dtype))
