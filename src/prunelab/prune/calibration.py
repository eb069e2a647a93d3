"""Calibration: token windows from a registry corpus, and Taylor importance taken
from the calibration loss's gradients without ever holding them all.

LLM-Pruner backpropagates into every parameter and keeps, per parameter, the
weight, its gradient and an accumulated squared gradient, about 12x the model's
size for a 7B model; keeping only the prunable parameters' gradients would still
cost the model's size again. Here only the prunable projection weights (and
biases) require gradients, and a post-accumulate-grad hook on each reduces its
gradient to the per-group scores the criterion needs the moment backward
produces it, then drops it: at most one parameter's gradient is alive at a time
(and a few in flight inside autograd). Each variant reduces as early as its
formula allows (G the gradient of the mean loss over all windows, one batch as
LLM-Pruner computes it; g_i one window's gradient; F = mean_i g_i^2):
  element1 |W G|, vector |sum W G|: one batch pass, reduced per parameter;
  element2 |W F W| / 2 = sum_i W^2 g_i^2 / 2N: one pass per window, each window's
      share reduced at once (no G needed);
  mix |-W G + W F W / 2|: G and F meet elementwise, so F is kept full size for
      every prunable parameter until the batch pass consumes it (the one variant
      that costs the prunable weights' size again).
The batch pass is one forward/backward over all windows: the loss is a mean, so
splitting it into micro-batches would sum gradients across them, and a hook could
reduce only after the last one, i.e. every gradient would be held until then.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from prunelab.prune.importance import Criterion, ElementSalience, Slice, aggregate, salience_fn, slice_scores


def calibration_windows(tokenizer, text: str, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at seeded random offsets: (N, L)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def _lm_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return model(input_ids=windows, labels=windows, use_cache=False).loss


def taylor_group_scores(model: nn.Module, blocks: dict[Hashable, list[Slice]], windows: torch.Tensor,
                        criterion: Criterion) -> dict[Hashable, torch.Tensor]:
    """Taylor importance (float32, one score per group) of every block's groups on
    the calibration `windows` (N, L); `blocks` maps a key to its module slices, as
    importance.group_scores takes them."""
    salience = salience_fn(criterion)
    scores = _SliceScores(blocks)
    with _gradients_only_for(model, scores.params):
        if criterion.variant == "element2":
            _each_window(model, windows, scores.params, lambda p, share: scores.add(p, salience, None, share))
        else:
            fisher: dict[nn.Parameter, torch.Tensor] = {}
            if criterion.variant == "mix":  # full size until the batch pass: see the module docstring
                _each_window(model, windows, scores.params, lambda p, share: _accumulate(fisher, p, share))
            vector = criterion.variant == "vector"
            with (_on_gradient(scores.params, lambda p, g: scores.add(p, salience, g, fisher.pop(p, None), vector)),
                  _recomputed_layers(model)):
                _lm_loss(model, windows).backward()
    return {key: aggregate(per_slice, criterion.aggregation) for key, per_slice in scores.totals().items()}


class _SliceScores:
    """Per block, the running per-group score of each of its slices, added to by
    parameter as the gradients arrive."""

    def __init__(self, blocks: dict[Hashable, list[Slice]]):
        self._blocks = blocks
        self._running: dict[tuple[Hashable, int], torch.Tensor] = {}
        self._places: dict[nn.Parameter, list[tuple[Hashable, int]]] = {}
        for key, slices in blocks.items():
            for index, item in enumerate(slices):
                self._places.setdefault(item.param, []).append((key, index))

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self._places)

    def add(self, param: nn.Parameter, salience: ElementSalience, grad: torch.Tensor | None,
            fisher: torch.Tensor | None, signed_then_abs: bool = False) -> None:
        for key, index in self._places[param]:
            score = slice_scores(self._blocks[key][index], salience, signed_then_abs, grad, fisher)
            running = self._running.get((key, index))
            self._running[(key, index)] = score if running is None else running.add_(score)

    def totals(self) -> dict[Hashable, list[torch.Tensor]]:
        """Per block, its slices' scores; a parameter backward never reached has a
        zero gradient, so zero scores."""
        return {key: [self._running.get((key, index), torch.zeros(item.param.shape[item.axis] // item.span))
                      for index, item in enumerate(slices)] for key, slices in self._blocks.items()}


def _accumulate(sums: dict[nn.Parameter, torch.Tensor], param: nn.Parameter, share: torch.Tensor) -> None:
    sums[param] = sums[param].add_(share) if param in sums else share


def _each_window(model: nn.Module, windows: torch.Tensor, params: list[nn.Parameter],
                 consume: Callable[[nn.Parameter, torch.Tensor], None]) -> None:
    """`consume(param, g_i^2 / N)` for every window i and parameter: one backward per
    window, each share handed over as its gradient arrives (LLM-Pruner's acc_grad)."""
    with _on_gradient(params, lambda p, g: consume(p, g.pow(2).div_(len(windows)))):
        for window in windows:
            _lm_loss(model, window.unsqueeze(0)).backward()


@contextmanager
def _on_gradient(params: Iterable[nn.Parameter], reduce: Callable[[nn.Parameter, torch.Tensor], None]) -> Iterator[None]:
    """While inside, `reduce(param, grad)` runs the moment backward has accumulated a
    parameter's gradient, which is then dropped: gradients never pile up."""

    def hook(param: nn.Parameter) -> None:
        reduce(param, param.grad)
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _recomputed_layers(model: nn.Module) -> Iterator[None]:
    """Activation checkpointing of every decoder layer while inside: the graph keeps
    only each layer's input, and backward recomputes a layer's activations when it
    reaches it. The batch pass's activations are otherwise the prune's largest
    allocation after the weights: about 0.1 GB per layer for 10 x 64 tokens at
    TinyLlama-1.1B's widths, 1.8 GB (0.4x the model) over the 18 layers from the first
    pruned one on; checkpointed, one layer's worth, for one more forward pass."""
    layers = model.get_decoder().layers
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


@contextmanager
def _gradients_only_for(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Only `params` require gradients while inside (every parameter's flag is
    restored after), and the model is in eval mode: no dropout, so a seed gives the
    same scores."""
    wanted = set(params)
    required = {p: p.requires_grad for p in model.parameters()}
    for p in required:
        p.requires_grad_(p in wanted)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for p, flag in required.items():
            p.requires_grad_(flag)
        model.train(was_training)
