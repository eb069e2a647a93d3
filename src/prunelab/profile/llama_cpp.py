"""llama.cpp as a second engine, through llama-cpp-python (`pip install prunelab[llama]`):
the speed a model has where it is served on CPUs, and its logits for checking an
export against transformers.

A model is exported to GGUF (prunelab.export) into a temporary folder first; timing is
greedy generation as in prunelab.profile.latency (the prompt's prefill on its own,
then one-token decode steps), one sequence at a time, which is how llama.cpp's
server decodes a single request.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prunelab.errors import FailedPrecondition
from prunelab.export import write_gguf
from prunelab.models import resolve_model
from prunelab.profile.latency import GenerationTiming

INSTALL_HINT = "llama.cpp is not installed: pip install 'prunelab[llama]' (builds llama-cpp-python, ~4 min on 2 cores)"


def engine_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise FailedPrecondition(INSTALL_HINT, field="engine") from None


class LlamaCppModel:
    """One GGUF file loaded in llama.cpp, with a context of `n_ctx` tokens."""

    def __init__(self, gguf_path: Path, *, n_ctx: int, threads: int = 0, all_logits: bool = False):
        engine_version()
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads or None,
                         n_threads_batch=threads or None, logits_all=all_logits, verbose=False)

    def time_generation(self, input_ids: torch.Tensor, decode_steps: int) -> GenerationTiming:
        """Greedy generation of one sequence (batch of 1) with llama.cpp's KV cache."""
        if len(input_ids) != 1:
            raise FailedPrecondition("llama.cpp times one sequence at a time: batch size 1", field="batch_sizes")
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(input_ids[0].tolist())
        tokens = [self._last_argmax()]
        prefilled = time.perf_counter()
        for _ in range(decode_steps):
            self.llm.eval([tokens[-1]])
            tokens.append(self._last_argmax())
        decoded = time.perf_counter()
        return GenerationTiming(1, prefilled - started, decoded - prefilled, decode_steps, torch.tensor([tokens]))

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """The `new_tokens` greedy continuation of `prompt` (token ids)."""
        return self.time_generation(torch.tensor([prompt]), new_tokens - 1).tokens[0].tolist()

    def token_logprobs(self, tokens: list[int]) -> np.ndarray:
        """log p(token t | tokens before t) for t = 1..len-1, from one pass (needs all_logits)."""
        self.llm.reset()
        self.llm.eval(tokens)
        logits = np.asarray(self.llm.scores[: len(tokens) - 1], dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return log_probs[np.arange(len(tokens) - 1), tokens[1:]]

    def _last_argmax(self) -> int:
        # llama-cpp-python keeps `scores` only with logits_all; the context holds the last position's either way
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def close(self) -> None:
        self.llm.close()


class ExportedModels:
    """Each spec exported once to GGUF in a temporary folder (removed on close) and loaded."""

    def __init__(self, specs: list[str], gguf_type: str, *, n_ctx: int, threads: int = 0):
        engine_version()  # missing engine: fail before exporting anything
        self._folder = tempfile.TemporaryDirectory(prefix="prunelab-llama-cpp-")
        self.models: dict[str, LlamaCppModel] = {}
        try:
            for index, spec in enumerate(specs):
                written = write_gguf(resolve_model(spec).path, Path(self._folder.name) / f"{index}.gguf", gguf_type)
                self.models[spec] = LlamaCppModel(written.path, n_ctx=n_ctx, threads=threads)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for model in self.models.values():
            model.close()
        self._folder.cleanup()
