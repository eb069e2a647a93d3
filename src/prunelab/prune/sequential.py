"""Layer-by-layer calibration: the calibration windows go through the decoder one
layer at a time, so every layer is measured on inputs that already went through
the pruned layers before it (as Wanda and SparseGPT do), and only one layer's
activations and statistics exist at once.

The windows are embedded once and stopped at the first decoder layer (the
positional embeddings and mask the model computed are kept per batch and passed
to every layer). Then, per layer: a statistics pass with hooks on the layer's
linear maps, the caller's change to the layer, and an output pass through the
changed layer that becomes the next layer's input. Written here because neither
transformers nor accelerate offers a layer-wise calibration loop; the hooks are
plain PyTorch forward hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunelab.models import LlamaFamilyAdapter
from prunelab.prune.correction import GramAccumulator

BATCH_SIZE = 8  # windows per forward call: bounds the attention scores' memory


class _ReachedFirstLayer(Exception):
    """Raised by the hook on layer 0 to stop the embedding pass there."""


@dataclass
class LayerInputs:
    """What the current layer reads: hidden states and the layer kwargs, per batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


# Linear maps that read the same input as another: their statistics are that one's.
SHARED_INPUT = {"k": "q", "v": "q", "up": "gate"}


class LayerStatistics:
    """Input statistics of a layer's linear maps from one pass over the calibration
    windows: the Gram matrix x^T x (SparseGPT, the structured refit) or only its
    diagonal, the squared input norm of every column (Wanda, OWL). float32 whatever
    the model's dtype. q/k/v (and gate/up) read one input, so share one statistic,
    freed when the last of them is released."""

    def __init__(self, linears: dict[str, nn.Linear], gram: bool, folds: int = 1):
        self.linears = linears
        self._accumulator = GramAccumulator(diagonal_only=not gram, folds=folds)
        self._owner = {name: SHARED_INPUT[name] if SHARED_INPUT.get(name) in linears else name for name in linears}
        self._readers = {owner: list(self._owner.values()).count(owner) for owner in set(self._owner.values())}

    def of(self, name: str) -> torch.Tensor:
        """The Gram matrix (d, d) or the squared column norms (d,) of linear `name`."""
        return self._accumulator.grams[self.linears[self._owner[name]]]

    def mean(self, name: str) -> torch.Tensor:
        """Each input column's mean over the calibration tokens (d,)."""
        linear = self.linears[self._owner[name]]
        return self._accumulator.sums[linear] / self._accumulator.tokens[linear]

    def tokens(self, name: str) -> int:
        return self._accumulator.tokens[self.linears[self._owner[name]]]

    def folds(self, name: str) -> list[torch.Tensor]:
        """The statistic of `name` split by forward call into the `folds` asked for."""
        return self._accumulator.fold_grams[self.linears[self._owner[name]]]

    def release(self, name: str) -> None:
        owner = self._owner[name]
        self._readers[owner] -= 1
        if self._readers[owner] == 0:
            self._accumulator.release(self.linears[owner])

    @contextmanager
    def recording(self) -> Iterator[LayerStatistics]:
        watched = [self.linears[owner] for owner in self._readers]
        with self._accumulator.watching(watched), self._accumulator.recording():
            yield self


LayerStep = Callable[[int, nn.Module, "LayerPass"], None]


class LayerPass:
    """The calibration inputs of one layer, and a way to run them through it."""

    def __init__(self, layer: nn.Module, inputs: LayerInputs):
        self.layer = layer
        self.inputs = inputs

    @torch.no_grad()
    def statistics(self, linears: dict[str, nn.Linear], *, gram: bool, folds: int = 1) -> LayerStatistics:
        """Statistics of `linears` (modules of this layer) on this layer's inputs."""
        stats = LayerStatistics(linears, gram, folds)
        with stats.recording():
            for _ in self._outputs():
                pass
        return stats

    def _outputs(self) -> Iterator[torch.Tensor]:
        for hidden, kwargs in zip(self.inputs.hidden, self.inputs.kwargs, strict=True):
            out = self.layer(hidden, **kwargs)
            yield out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple

    @torch.no_grad()
    def outputs(self) -> LayerInputs:
        return LayerInputs(list(self._outputs()), self.inputs.kwargs)


def layer_by_layer(model: nn.Module, windows: torch.Tensor, step: LayerStep, batch_size: int = BATCH_SIZE) -> None:
    """Call `step(index, layer, layer_pass)` for every decoder layer in order; each
    layer's inputs are the previous layer's outputs after its step ran."""
    adapter = LlamaFamilyAdapter(model)
    inputs = first_layer_inputs(model, windows, batch_size)
    for index, layer in enumerate(adapter.layers):
        layer_pass = LayerPass(layer, inputs)
        step(index, layer, layer_pass)
        inputs = layer_pass.outputs()  # the previous inputs are freed here


@torch.no_grad()
def first_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = BATCH_SIZE) -> LayerInputs:
    """Hidden states and kwargs that reach decoder layer 0, per batch of windows."""
    decoder = model.get_decoder()
    captured = LayerInputs([], [])

    def stop_at_first_layer(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.kwargs.append({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")})
        raise _ReachedFirstLayer

    handle = decoder.layers[0].register_forward_pre_hook(stop_at_first_layer, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                decoder(input_ids=batch.to(model.device), use_cache=False)
            except _ReachedFirstLayer:
                pass
    finally:
        handle.remove()
    return captured
