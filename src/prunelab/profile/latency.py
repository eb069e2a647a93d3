"""Wall-clock timing of greedy generation with the KV cache: the prompt's prefill,
timed on its own, then a fixed number of one-token decode steps, timed together.

Models to compare are timed in rounds, one generation each: slow phases of a shared
machine then hit all of them alike, and the ratio within a round cancels most of the
drift. The model that goes first turns with every round (A B, B A, A B, ...), so
whatever favours a position (caches warmed by the previous run, a frequency ramp)
favours every model equally often instead of always the baseline.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

PROMPT_SEED = 0


@dataclass(frozen=True)
class Spread:
    """A sample's median, quartiles and extremes, with the samples themselves."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        samples = list(samples)
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
        return cls(statistics.median(samples), q1, q3, min(samples), max(samples), samples)


@dataclass(frozen=True)
class GenerationTiming:
    batch_size: int
    prefill_s: float  # the prompt's forward pass, filling the cache
    decode_s: float  # all decode steps together
    decode_steps: int
    tokens: torch.Tensor  # batch x (decode_steps + 1): what generate(max_new_tokens=decode_steps + 1) returns

    @property
    def prefill_ms(self) -> float:
        return self.prefill_s * 1000

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * self.decode_steps / self.decode_s


def prompt_ids(batch_size: int, seq_len: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The same random prompt for every model and run (content does not change the
    cost of a dense forward pass, but a fixed one rules it out)."""
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)


def timed_round(timers: Sequence[Callable[[torch.Tensor, int], GenerationTiming]], input_ids: torch.Tensor, decode_steps: int,
                round_index: int = 0) -> list[GenerationTiming]:
    """One timed generation per model (`timers`: each model's `time_generation`), model
    `round_index % len(timers)` first and the rest after it in turn; the timings are
    returned in the models' order."""
    first = round_index % len(timers)
    order = [(first + offset) % len(timers) for offset in range(len(timers))]
    timings = {index: timers[index](input_ids, decode_steps) for index in order}
    return [timings[index] for index in range(len(timers))]


@torch.inference_mode()
def time_generation(model: PreTrainedModel, input_ids: torch.Tensor, decode_steps: int) -> GenerationTiming:
    """Greedy generation as `generate(do_sample=False)` does it (logits of the last
    position only, the cache carried from step to step; checked against `generate`
    in the tests), without generate's per-step bookkeeping in the timings."""
    device = input_ids.device
    _synchronize(device)
    started = time.perf_counter()
    output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    tokens = [output.logits[:, -1].argmax(-1, keepdim=True)]
    _synchronize(device)
    prefilled = time.perf_counter()
    cache = output.past_key_values
    for _ in range(decode_steps):
        output = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
        tokens.append(output.logits[:, -1].argmax(-1, keepdim=True))
    _synchronize(device)
    decoded = time.perf_counter()
    return GenerationTiming(len(input_ids), prefilled - started, decoded - prefilled, decode_steps, torch.cat(tokens, dim=1))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
