"""Tuning a sparse checkpoint keeps its zeros.

A checkpoint whose provenance has a "sparsity" record (magnitude, Wanda, SparseGPT)
has exact zeros in its decoder linear weights. LoRA's update s·B·A is a dense
low-rank matrix, so folding it in fills every one of them. The zeros are recorded
before training and set again on the merged weights, before the guard measures the
merged model: the guard then judges the model that is returned, and a sparse input
gives a sparse result with exactly its zero pattern.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from prunelab.models import LlamaFamilyAdapter, LoadedModel, read_provenance
from prunelab.prune.job import SPARSITY_KEY

ProjectionKey = tuple[int, str]  # (decoder layer, "q" | "k" | ... | "down")


def decoder_linears(model: PreTrainedModel) -> Iterator[tuple[ProjectionKey, nn.Linear]]:
    """The q/k/v/o/gate/up/down projections of every decoder layer, the weights sparse pruning zeroes."""
    adapter = LlamaFamilyAdapter(model)
    for layer in range(adapter.num_layers):
        for name, linear in adapter.linears(layer).items():
            yield (layer, name), linear


class ZeroPattern:
    """Where a model's decoder linear weights are exactly zero.

    One bool per weight (1 byte: a quarter of the fp32 weights, half of bf16 ones),
    kept on the CPU so a CUDA job spends no accelerator memory on it."""

    def __init__(self, model: PreTrainedModel):
        self.masks = {key: (linear.weight == 0).cpu() for key, linear in decoder_linears(model)}

    @classmethod
    def of_sparse(cls, loaded: LoadedModel) -> ZeroPattern | None:
        """The zeros of `loaded` when its provenance says it is sparse; None for a dense model,
        which keeps LoRA's dense merge (its few incidental zeros are no pattern to keep)."""
        return cls(loaded.model) if SPARSITY_KEY in read_provenance(loaded.source.path) else None

    @torch.no_grad()
    def restore(self, model: PreTrainedModel) -> None:
        """Set the recorded zeros again in `model`'s weights (the same architecture, e.g. merged)."""
        for key, linear in decoder_linears(model):
            linear.weight.masked_fill_(self.masks[key].to(linear.weight.device), 0)


def sparsity_record(parent: dict[str, Any], model: PreTrainedModel) -> dict[str, Any]:
    """The parent's "sparsity" provenance with the tuned model's nonzero count: the zero
    pattern is the parent's, so a second tuning, the profiler and the report see a
    sparse model. {} for a dense parent."""
    if SPARSITY_KEY not in parent:
        return {}
    return {SPARSITY_KEY: {**parent[SPARSITY_KEY], "nonzero_params": LlamaFamilyAdapter(model).num_nonzero_parameters()}}
