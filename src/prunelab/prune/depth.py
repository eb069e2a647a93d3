"""Depth pruning: whole decoder layers removed, the rest of the model untouched.

Which layers go (PruneSettings.depth_criterion):
- `block-influence` (ShortGPT, Men et al. 2024): a layer's influence is
  1 - cos(x_in, x_out) of the hidden states it reads and writes, averaged over every
  calibration token; the n layers that change the residual stream least go.
- `angular` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"):
  the n consecutive layers l..l+n-1 whose input x_l and output x_{l+n} are closest,
  by arccos(cos(x_l, x_{l+n})) / pi averaged over tokens. The paper measures the
  last token of each sequence; prunelab's calibration windows are random slices of a
  corpus, so their last token is no more meaningful than any other, and averaging
  over every token gives samples x seq_len measurements instead of samples (10 with
  the default recipe), which makes the choice far less noisy.
- `last`: the last n layers (the final norm and the head stay); no calibration.

n comes from the ratio (params_ratio: share of the whole model's parameters): the
whole number of layers whose removal is closest to it. Layers are indivisible, so the
share got differs from the asked one by up to half a layer's share; the report says
both, and never pretends otherwise. One pass of the unpruned model over the
calibration windows, layer by layer (sequential.py), measures either criterion; only
the hidden states of the layers the metric spans are held (two for block influence,
n + 1 for angular).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import torch
from torch.nn.functional import cosine_similarity

from prunelab.errors import InvalidArgument
from prunelab.models import LlamaFamilyAdapter
from prunelab.prune.calibration import calibration_windows
from prunelab.prune.pruner import PruneReport, _Pruner
from prunelab.prune.sequential import LayerPass, first_layer_inputs

TokenMeasure = Callable[[torch.Tensor], torch.Tensor]  # per-token cosines -> per-token values to average


def layers_to_remove(ratio: float, layer_params: list[int], params_before: int) -> int:
    """The number of whole layers whose removal is closest to `ratio` of
    `params_before`; InvalidArgument when that is none or all of them. Layers of
    different widths (a width-pruned model) are priced at their mean size."""
    per_layer = sum(layer_params) / len(layer_params)
    share = per_layer / params_before
    count = math.floor(ratio / share + 0.5)
    if count < 1:
        raise InvalidArgument(
            f"ratio {ratio:.4g} removes no whole layer: one layer is {share:.2%} of the parameters, "
            f"so ask at least {share / 2:.2%}", field="ratio")
    if count >= len(layer_params):
        raise InvalidArgument(
            f"ratio {ratio:.4g} would remove all {len(layer_params)} layers; keeping one leaves at most "
            f"{(len(layer_params) - 1) * share:.2%} removed, so ask below {(len(layer_params) - 0.5) * share:.2%}",
            field="ratio")
    return count


@torch.no_grad()
def mean_over_tokens(model, windows: torch.Tensor, span: int, measure: TokenMeasure) -> list[float]:
    """For every l in 0..L-span: the mean over all calibration tokens of
    measure(cos(x_l, x_{l+span})), where x_l is what decoder layer l reads and x_L the
    last layer's output (before the final norm). Cosines in float32 whatever the
    model's dtype."""
    inputs = first_layer_inputs(model, windows)
    boundaries = deque([inputs.hidden], maxlen=span + 1)  # the hidden states the metric still needs
    means = []
    for layer in LlamaFamilyAdapter(model).layers:
        inputs = LayerPass(layer, inputs).outputs()
        boundaries.append(inputs.hidden)
        if len(boundaries) == span + 1:
            total = sum(measure(cosine_similarity(start.float(), end.float(), dim=-1)).sum().item()
                        for start, end in zip(boundaries[0], boundaries[-1], strict=True))
            means.append(total / windows.numel())
    return means


def block_influence(model, windows: torch.Tensor) -> list[float]:
    """ShortGPT's BI of every layer: 1 - mean cos(layer input, layer output)."""
    return [1 - cos for cos in mean_over_tokens(model, windows, 1, lambda cos: cos)]


def angular_distances(model, windows: torch.Tensor, span: int) -> list[float]:
    """Gromov et al.'s distance between x_l and x_{l+span} for every start l, in [0, 1]."""
    return mean_over_tokens(model, windows, span, lambda cos: torch.arccos(cos.clamp(-1, 1)) / math.pi)


def lowest(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` smallest scores; ties go to the earlier index."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count])


class DepthJob(_Pruner):
    """Removes whole decoder layers of one loaded model, in place."""

    def run(self) -> PruneReport:
        s = self.settings
        num_layers = self.adapter.num_layers
        params_before = self.adapter.num_parameters()
        layer_params = [sum(p.numel() for p in layer.parameters()) for layer in self.adapter.layers]
        count = layers_to_remove(s.ratio, layer_params, params_before)  # fails fast, before the calibration pass
        scores = self._timed("importance", self._scores, count)
        removed = self._choose(scores, count, num_layers)
        kept = [i for i in range(num_layers) if i not in removed]
        self.progress("prune", 0.85, f"removing layers {removed} of {num_layers}")
        self._timed("prune", self.adapter.keep_layers, kept)
        params_after = self.adapter.num_parameters()
        structure = {"layers": {"removed": removed, "kept": kept}}
        if scores:
            structure["scores"] = {s.depth_criterion: scores}
        return PruneReport(
            ratio_asked=s.ratio, semantics=s.semantics, ratio_got=1 - params_after / params_before,
            params_before=params_before, params_after=params_after,
            layer_widths=[w.as_dict() for w in self.adapter.layer_widths()],
            kept=structure, timings_s=self.timings, nonzero_params=self.adapter.num_nonzero_parameters(),
        )

    def _scores(self, count: int) -> list[float]:
        """block-influence: one score per layer; angular: one per start layer of a
        run of `count`; last: none."""
        s = self.settings
        if s.depth_criterion == "last":
            return []
        self.progress("calibrate", 0.1, f"{s.samples} windows of {s.seq_len} tokens from {s.calibration}")
        windows = calibration_windows(self.tokenizer, self.text, s.samples, s.seq_len, s.seed)
        self.progress("importance", 0.2, f"{s.depth_criterion} of {self.adapter.num_layers} layers")
        if s.depth_criterion == "angular":
            return angular_distances(self.model, windows, count)
        return block_influence(self.model, windows)

    def _choose(self, scores: list[float], count: int, num_layers: int) -> list[int]:
        criterion = self.settings.depth_criterion
        if criterion == "last":
            return list(range(num_layers - count, num_layers))
        if criterion == "angular":
            [start] = lowest(scores, 1)
            return list(range(start, start + count))
        return lowest(scores, count)
