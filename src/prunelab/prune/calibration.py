"""Calibration: token windows from a registry corpus and the gradients Taylor
importance needs, computed without LLM-Pruner's memory bill.

LLM-Pruner backpropagates into every parameter and keeps, per parameter, the
weight, its gradient and an accumulated squared gradient (plus Adam-free copies),
about 12x the model's size for a 7B model. Here only the prunable projection
weights (and biases) require gradients, embeddings and the LM head stay frozen,
and the squared-gradient accumulator exists only for the second-order variants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


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


def taylor_gradients(
    model: nn.Module, params: Iterable[nn.Parameter], windows: torch.Tensor, *, fisher: bool,
    around_batch_pass: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[dict[nn.Parameter, torch.Tensor], dict[nn.Parameter, torch.Tensor]]:
    """Gradient of the mean calibration loss for `params` and, when `fisher`, the
    mean over samples of each sample's squared gradient (LLM-Pruner's acc_grad).
    Every other parameter is frozen for the duration and restored after. The one
    forward pass over all windows runs inside `around_batch_pass()`, so callers can
    observe its activations without a pass of their own."""
    params = list(params)
    wanted = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in wanted and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    was_training = model.training
    model.eval()  # no dropout: the same seed gives the same scores
    try:
        squared: dict[nn.Parameter, torch.Tensor] = {}
        if fisher:
            for window in windows:
                _lm_loss(model, window.unsqueeze(0)).backward()
                for p in params:
                    acc = p.grad.pow(2).div_(len(windows))
                    squared[p] = squared[p].add_(acc) if p in squared else acc
                    p.grad = None
        with around_batch_pass():
            loss = _lm_loss(model, windows)
        loss.backward()
        grads = {p: p.grad for p in params}
        for p in params:
            p.grad = None
        return grads, squared
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
