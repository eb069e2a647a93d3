"""Closed-form correction of the weights that read pruned channels.

Removing MLP channels (or attention heads) deletes their contribution to
down_proj's (o_proj's) output. On calibration inputs x (the activations entering
that projection, shape (tokens, d)), the kept columns K can be refit by ridge
least squares so the projection reproduces the unpruned output as well as the
kept channels allow:

    W'_K = argmin ||x_K W'_K^T - x W^T||^2 + lam ||W'_K - W_K||^2
         = W_K + W_R G[R, K] (G[K, K] + lam I)^-1,      G = x^T x  (d, d)

with R the removed columns: the removed channels' contribution is predicted
from the kept channels that correlate with them.

Only the Gram matrix G is needed, accumulated by a forward hook during the
calibration pass the importance already makes, so the cost is a (d, d) product
per pass and a (k, k) solve per layer; the model's architecture is unchanged (no new biases). This is the same least-squares
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

# Ridge toward the original weights: lam = DAMPING * mean(diag(G)). Calibration is
# small (LLM-Pruner's 10 x 64 tokens, fewer than down_proj's inputs), so G is
# rank-deficient and a weak ridge overfits it. Measured on SmolLM2-135M, taylor,
# 28.9 % removed, 10 x 64 PTB tokens, WikiText-2 ppl (seq 128, 300 windows):
# no correction 197; DAMPING 0.01 -> 1698, 0.1 -> 187, 1 -> 143, 3 -> 143, 10 -> 149.
DAMPING = 1.0


class GramAccumulator:
    """Sums x^T x of the inputs of chosen Linear modules (or, `diagonal_only`, only
    its diagonal: each input column's squared norm), and each column's plain sum
    (for means and variances). With `folds` > 1 whole windows are dealt round
    robin into that many separate sums as well (`fold_grams`; `grams` is their
    total), so a choice can be fitted on some windows and checked on the others. Hooks stay attached while
    `watching`, but only passes run inside `recording()` count, so a caller can
    share one forward pass (e.g. the Taylor pass) and skip others."""

    def __init__(self, diagonal_only: bool = False, folds: int = 1) -> None:
        self.diagonal_only = diagonal_only
        self.folds = folds
        self.grams: dict[nn.Linear, torch.Tensor] = {}
        self.fold_grams: dict[nn.Linear, list[torch.Tensor]] = {}
        self.sums: dict[nn.Linear, torch.Tensor] = {}
        self.tokens: dict[nn.Linear, int] = {}
        self._windows_seen: dict[nn.Linear, int] = {}
        self._recording = False

    def hook(self, module: nn.Linear, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        if not self._recording:
            return
        # float32 sums are exact enough for a damped solve and twice as fast as float64 on CPU
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (tokens, d)
        gram = self._add_to_folds(module, inputs[0].detach()) if self.folds > 1 else self._statistic(x)
        _add(self.grams, module, gram)
        _add(self.sums, module, x.sum(0))
        self.tokens[module] = self.tokens.get(module, 0) + x.shape[0]

    def _statistic(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).sum(0) if self.diagonal_only else x.T @ x

    def _add_to_folds(self, module: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        """Whole windows are dealt round robin into the folds (tokens of one window
        are alike, so splitting inside a window would not hold anything out);
        returns this call's total, so the full statistic is not computed again."""
        windows = inputs.reshape(-1, *inputs.shape[-2:]) if inputs.dim() > 2 else inputs.unsqueeze(0)
        first = self._windows_seen.get(module, 0)
        self._windows_seen[module] = first + windows.shape[0]
        folds = self.fold_grams.get(module) or [None] * self.folds
        total = None
        for offset in range(self.folds):
            gram = self._statistic(windows[(offset - first) % self.folds :: self.folds].reshape(-1, windows.shape[-1]).float())
            folds[offset] = gram if folds[offset] is None else folds[offset] + gram
            total = gram if total is None else total + gram
        self.fold_grams[module] = folds
        return total

    def release(self, module: nn.Linear) -> None:
        for store in (self.grams, self.fold_grams, self.sums):
            store.pop(module, None)

    @contextmanager
    def watching(self, modules: list[nn.Linear]) -> Iterator[GramAccumulator]:
        handles = [m.register_forward_hook(self.hook) for m in modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def recording(self) -> Iterator[GramAccumulator]:
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False


def _add(store: dict[nn.Linear, torch.Tensor], module: nn.Linear, value: torch.Tensor) -> None:
    store[module] = store[module] + value if module in store else value


def refit_kept_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """New weight (out, len(kept)) for a projection whose input keeps only `kept`
    columns, given the unpruned weight (out, d) and the input Gram matrix (d, d)."""
    # float32 throughout: the ridge bounds the system's condition number by
    # (largest eigenvalue + lam) / lam, and float64 products cost 4x on CPUs.
    gram = gram.float()
    w = weight.float()
    removed = torch.ones(gram.shape[0], dtype=torch.bool, device=gram.device)
    removed[kept] = False
    lam = damping * torch.diagonal(gram).mean().clamp_min(1e-12)
    g_kk = gram[kept][:, kept] + lam * torch.eye(len(kept), dtype=gram.dtype, device=gram.device)
    carried = w[:, removed] @ gram[removed][:, kept]  # (out, k): W_R G[R, K]
    # g_kk is symmetric positive definite, so a Cholesky solve: X g_kk = carried
    shift = torch.cholesky_solve(carried.T, torch.linalg.cholesky(g_kk)).T
    return (w[:, kept] + shift).to(weight.dtype)


# The ridge of the layer-by-layer refit is measured per projection, not hand-set:
# each candidate is fitted on one half of the calibration windows and scored by
# its reconstruction error on the other half (and the other way round); the one
# with the lowest held-out error is then refit on all of them.
DAMPING_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def heldout_error(new_weight: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> float:
    """||x_K W'^T - x W^T||^2 on the tokens whose Gram is `gram`, up to a constant
    (the unpruned output's energy, the same for every candidate)."""
    w_new = new_weight.float()
    fitted = (w_new @ gram[kept][:, kept] * w_new).sum()
    cross = (w_new @ gram[kept, :] * weight.float()).sum()
    return float(fitted - 2 * cross)


def measured_damping(weight: torch.Tensor, folds: list[torch.Tensor], kept: torch.Tensor) -> float:
    """The DAMPING_GRID value whose refit reconstructs held-out folds best: each fold
    is fitted in turn and the others score it. One eigendecomposition per fold serves
    every candidate ridge. Folds without tokens leave nothing to measure: DAMPING."""
    if any(not fold.any() for fold in folds):
        return DAMPING
    w = weight.float()
    removed = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    removed[kept] = False
    errors = torch.zeros(len(DAMPING_GRID), dtype=torch.float64)
    for i, fit in enumerate(folds):
        fit = fit.float()
        eigenvalues, vectors = torch.linalg.eigh(fit[kept][:, kept])
        carried = (w[:, removed] @ fit[removed][:, kept]) @ vectors  # W_R G[R, K] in the eigenbasis
        scale = torch.diagonal(fit).mean().clamp_min(1e-12)
        for k, damping in enumerate(DAMPING_GRID):
            new_weight = w[:, kept] + (carried / (eigenvalues + damping * scale)) @ vectors.T
            errors[k] += sum(heldout_error(new_weight, w, check.float(), kept) for j, check in enumerate(folds) if j != i)
    return DAMPING_GRID[int(torch.argmin(errors))]


def bias_compensation(weight: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """FLAP's bias: what the removed input columns added on average, W_R E[x_R] (out,)."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept] = False
    return (weight.float()[:, removed] @ mean.float()[removed]).to(weight.dtype)
