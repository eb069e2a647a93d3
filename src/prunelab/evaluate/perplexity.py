"""Perplexity exactly as LLM-Pruner measures it (LLMPruner/datasets/ppl_dataset.py and
LLMPruner/evaluator/ppl.py): the split's rows joined with "\\n\\n", tokenized once,
cut into non-overlapping windows of `seq_len` tokens (the remainder dropped); each
window is scored on its own, and ppl = exp(mean next-token NLL over every scored
token of every window), i.e. `seq_len - 1` tokens per window.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prunelab.data import resolve_text
from prunelab.errors import InvalidArgument

DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8
# LLM-Pruner joins the hub rows (WikiText paragraphs, PTB sentences) with a blank line.
ROW_JOINER = "\n\n"

WindowProgress = Callable[[int, int], None]  # (windows done, windows total)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float  # nats per scored token
    seq_len: int
    windows: int
    tokens: int  # tokens scored: windows x (seq_len - 1)


@dataclass(frozen=True)
class CorpusText:
    corpus: str
    split: str
    text: str  # rows joined as LLM-Pruner joins them
    sha256: str  # of the split's text as read (the stored file's sha256 for UTF-8 with LF line ends)


def corpus_text(corpus: str, split: str = "validation") -> CorpusText:
    """The text LLM-Pruner would score for `split` of `corpus` (wikitext2, ptb, a stored
    text dataset or a local file): one row per line, rows joined with a blank line."""
    raw = resolve_text(corpus, split)
    return CorpusText(corpus, split, ROW_JOINER.join(raw.splitlines()), hashlib.sha256(raw.encode()).hexdigest())


def token_windows(tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """(windows, seq_len) token ids: `text` tokenized once, the remainder dropped."""
    if seq_len < 2:
        raise InvalidArgument(f"seq_len must be at least 2 (one token predicts the next), got {seq_len}", field="seq_len")
    if max_windows is not None and max_windows < 1:
        raise InvalidArgument(f"max_windows must be positive, got {max_windows}", field="max_windows")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise InvalidArgument(f"the text is {ids.numel()} tokens, shorter than one window of {seq_len}", field="seq_len")
    return ids[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_windows: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_windows: WindowProgress | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on `text` (already joined; see `corpus_text`), scoring
    the first `max_windows` windows (all when None), `batch_size` windows per forward."""
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be positive, got {batch_size}", field="batch_size")
    windows = token_windows(tokenizer, text, seq_len, max_windows)
    device = next(model.parameters()).device
    nll_sum = 0.0
    done = 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)  # (B, T)
        logits = model(batch).logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        # Summed in float64 on the host: a float32 running sum over millions of tokens drifts.
        nll_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum").item()
        done += batch.size(0)
        if on_windows is not None:
            on_windows(done, windows.size(0))
    tokens = windows.size(0) * (seq_len - 1)
    mean_nll = nll_sum / tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, seq_len, windows.size(0), tokens)
