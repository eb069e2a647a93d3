"""How much to remove in each layer so the result matches what was asked.

LLM-Pruner applies its ratio to the heads and channels inside the chosen layers
only, so "0.5" on SmolLM2 layers 4-27 removes 28.9 % of the model. prunelab's
default semantics, `params_ratio`, counts the whole model (embeddings and head
included) and solves for per-layer amounts that land on the asked share;
`layer_ratio` keeps LLM-Pruner's arithmetic to reproduce published numbers.

Units: attention is pruned in whole KV groups (one KV head with the query heads
that share it, so grouped-query attention stays consistent); the MLP in
intermediate channels. Every layer keeps at least one group and one channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prunelab.errors import InvalidArgument

SEMANTICS = ("params_ratio", "layer_ratio")
TOLERANCE = 0.005  # of the whole model: the promise is "within 0.5 percentage points"


@dataclass(frozen=True)
class LayerShape:
    """Prunable widths of one decoder layer and the parameters each unit carries."""

    kv_groups: int  # KV heads
    group_params: int  # parameters of one KV group (q, k, v rows + biases, o columns)
    mlp_channels: int  # intermediate size
    channel_params: int  # parameters of one MLP channel (gate, up rows, down column)


@dataclass(frozen=True)
class RemovalPlan:
    """How many KV groups / MLP channels to remove per layer (index = layer)."""

    kv_groups: list[int]
    mlp_channels: list[int]

    def removed_params(self, shapes: list[LayerShape]) -> int:
        return sum(
            g * s.group_params + c * s.channel_params
            for g, c, s in zip(self.kv_groups, self.mlp_channels, shapes, strict=True)
        )


def check_ratio(ratio: float) -> None:
    if not (0.0 < ratio < 1.0) or math.isnan(ratio):
        raise InvalidArgument(f"ratio must be in (0, 1), got {ratio}", field="ratio")


def layer_ratio_plan(shapes: list[LayerShape], attn_layers: range, mlp_layers: range, ratio: float, head_dim: int) -> RemovalPlan:
    """LLM-Pruner's arithmetic (torch_pruning's MetaPruner): in each chosen layer keep
    int(width * (1 - ratio)) channels; attention is counted in k_proj rows and
    rounded down to whole KV heads (its `consecutive_groups`)."""
    check_ratio(ratio)
    groups, channels = [], []
    for i, s in enumerate(shapes):
        if i in attn_layers:
            rows = s.kv_groups * head_dim
            groups.append((rows - int(rows * (1 - ratio))) // head_dim)
        else:
            groups.append(0)
        channels.append(s.mlp_channels - int(s.mlp_channels * (1 - ratio)) if i in mlp_layers else 0)
    return RemovalPlan(groups, channels)


def params_ratio_plan(shapes: list[LayerShape], attn_layers: range, mlp_layers: range, ratio: float, total_params: int) -> RemovalPlan:
    """The same number of KV groups removed in every attention layer and the same
    number of channels in every MLP layer, chosen so the whole model loses `ratio`
    of its parameters as closely as the MLP's channel granularity allows.

    Among the attention amounts that can reach the target, the one whose share of
    attention removed is closest to the MLP's share wins: that splits the cut the
    way LLM-Pruner's single ratio does, instead of emptying one block type."""
    attn, mlp = [shapes[i] for i in attn_layers], [shapes[i] for i in mlp_layers]
    candidates = _uniform_candidates(shapes, attn_layers, mlp_layers, ratio, total_params)
    if not candidates:
        reachable = max_reachable_ratio(shapes, attn_layers, mlp_layers, total_params)
        why = (
            f"the largest reachable is {reachable:.4f}"
            if ratio > reachable
            else "whole KV groups are too coarse to land within 0.5 points; allow MLP layers too"
        )
        raise InvalidArgument(
            f"ratio {ratio:.4f} of the whole model cannot be removed within attention layers "
            f"{_span(attn_layers)} and MLP layers {_span(mlp_layers)}: {why}",
            field="ratio",
        )
    groups, channels = min(candidates, key=lambda c: abs(_share(c[0], attn, "kv") - _share(c[1], mlp, "mlp")))
    return _uniform_plan(len(shapes), attn_layers, mlp_layers, groups, channels)


def mlp_first_plan(shapes: list[LayerShape], attn_layers: range, mlp_layers: range, ratio: float, total_params: int,
                   cap: float) -> RemovalPlan | None:
    """The fewest KV groups per attention layer (the same in each) that let uniform
    MLP channel removal reach `ratio` of the whole model while taking at most `cap`
    of each MLP's channels; None when no amount of attention does."""
    mlp_width = min((shapes[i].mlp_channels for i in mlp_layers), default=0)
    for groups, channels in _uniform_candidates(shapes, attn_layers, mlp_layers, ratio, total_params):
        if channels <= cap * mlp_width:
            return _uniform_plan(len(shapes), attn_layers, mlp_layers, groups, channels)
    return None


def spare_layers(plan: RemovalPlan, shapes: list[LayerShape], spared: set[int], share: float) -> RemovalPlan:
    """The same MLP channels removed in all, but each `spared` layer loses at most
    `share` of its own; what they keep is taken evenly from the other layers that
    remove channels. The plan unchanged when those cannot take it."""
    channels = list(plan.mlp_channels)
    moved = 0
    for i in spared:
        limit = math.floor(share * shapes[i].mlp_channels)
        moved += max(channels[i] - limit, 0)
        channels[i] = min(channels[i], limit)
    others = [i for i, removed in enumerate(channels) if removed and i not in spared]
    if not moved or not others or len({shapes[i].channel_params for i in others + sorted(spared)}) > 1:
        return plan  # channels of different costs could not move without moving the ratio
    for rank, i in enumerate(others):
        channels[i] += moved // len(others) + (rank < moved % len(others))
    if any(channels[i] >= shapes[i].mlp_channels for i in others):
        return plan
    return RemovalPlan(list(plan.kv_groups), channels)


def _uniform_candidates(shapes: list[LayerShape], attn_layers: range, mlp_layers: range, ratio: float,
                        total_params: int) -> list[tuple[int, int]]:
    """(KV groups, MLP channels) removed per layer that land within TOLERANCE of
    `ratio`, fewest groups first."""
    check_ratio(ratio)
    target = ratio * total_params
    attn = [shapes[i] for i in attn_layers]
    mlp = [shapes[i] for i in mlp_layers]
    per_channel_round = sum(s.channel_params for s in mlp)
    candidates = []
    for groups in range(_max_removable(attn, "kv") + 1):
        attn_removed = sum(groups * s.group_params for s in attn)
        channels = round((target - attn_removed) / per_channel_round) if per_channel_round else 0
        channels = min(max(channels, 0), _max_removable(mlp, "mlp"))
        if abs(attn_removed + channels * per_channel_round - target) <= TOLERANCE * total_params:
            candidates.append((groups, channels))
    return candidates


def _uniform_plan(layers: int, attn_layers: range, mlp_layers: range, groups: int, channels: int) -> RemovalPlan:
    return RemovalPlan([groups if i in attn_layers else 0 for i in range(layers)],
                       [channels if i in mlp_layers else 0 for i in range(layers)])


def max_reachable_ratio(shapes: list[LayerShape], attn_layers: range, mlp_layers: range, total_params: int) -> float:
    """Everything but one KV group and one channel per allowed layer."""
    removable = sum((shapes[i].kv_groups - 1) * shapes[i].group_params for i in attn_layers)
    removable += sum((shapes[i].mlp_channels - 1) * shapes[i].channel_params for i in mlp_layers)
    return removable / total_params


def _max_removable(shapes: list[LayerShape], block: str) -> int:
    if not shapes:
        return 0
    widths = [s.kv_groups if block == "kv" else s.mlp_channels for s in shapes]
    return min(widths) - 1


def _share(removed: int, shapes: list[LayerShape], block: str) -> float:
    if not shapes:
        return 0.0
    return removed / (shapes[0].kv_groups if block == "kv" else shapes[0].mlp_channels)


def _span(layers: range) -> str:
    return f"{layers.start}:{layers.stop}" if len(layers) else "(none)"
