"""Closed-form correction of the weights that read pruned channels.

Removing MLP channels (or attention heads) deletes their contribution to
down_proj's (o_proj's) output. On calibration inputs x (the activations entering
that projection, shape (tokens, d)), the kept columns K can be refit by ridge
least squares so the projection reproduces the unpruned output as well as the
kept channels allow:

    W'_K = argmin ||x_K W'_K^T - x W^T||^2 + lam ||W'_K - W_K||^2
         = (W G[:, K] + lam W_K) (G[K, K] + lam I)^-1,      G = x^T x  (d, d)

Only the Gram matrix G is needed, accumulated by a forward hook, so the cost is
one forward pass over the calibration tokens and a (k, k) solve per layer; the
model's architecture is unchanged (no new biases). This is the same least-squares
reconstruction that layer-wise pruning methods use (e.g. SparseGPT/ZipLM-style
"optimal brain" updates without the iterative column order); prunelab applies
it once after structured removal, written here because no library offers it for
structured Llama pruning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Relative ridge toward the original weights: lam = DAMPING * mean(diag(G)). Keeps
# the solve well-posed when the calibration has fewer tokens than channels or
# channels are collinear, and falls back to plain removal as lam grows.
DAMPING = 0.01


class GramAccumulator:
    """Sums x^T x of the inputs of chosen Linear modules during forward passes."""

    def __init__(self) -> None:
        self.grams: dict[nn.Linear, torch.Tensor] = {}
        self.tokens: dict[nn.Linear, int] = {}

    def hook(self, module: nn.Linear, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        # float32 sums are exact enough for a damped solve and twice as fast as float64 on CPU
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (tokens, d)
        gram = x.T @ x
        self.grams[module] = self.grams[module] + gram if module in self.grams else gram
        self.tokens[module] = self.tokens.get(module, 0) + x.shape[0]

    @contextmanager
    def watching(self, modules: list[nn.Linear]) -> Iterator["GramAccumulator"]:
        handles = [m.register_forward_hook(self.hook) for m in modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def refit_kept_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """New weight (out, len(kept)) for a projection whose input keeps only `kept`
    columns, given the unpruned weight (out, d) and the input Gram matrix (d, d)."""
    gram = gram.double()  # the (k, k) solve is cheap; do it in double
    g_kk = gram[kept][:, kept]
    lam = damping * torch.diagonal(gram).mean().clamp_min(1e-12)
    w = weight.double()
    rhs = w @ gram[:, kept] + lam * w[:, kept]  # (out, k)
    solved = torch.linalg.solve(g_kk + lam * torch.eye(len(kept), dtype=gram.dtype), rhs.T).T
    return solved.to(weight.dtype)
