"""What a profile measures, checked before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.errors import FailedPrecondition, InvalidArgument
from prunelab.limits import check_limit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENGINES = ("torch", "llama.cpp")  # what the timings run in; the counts and memory are torch's either way
GGUF_TYPES = ("f16", "q8_0")  # what a model is exported as for llama.cpp (prunelab.export.OUTTYPES)


@dataclass(frozen=True)
class ProfileOptions:
    seq_len: int = 64  # prompt length: MACs, memory and prefill are measured at it
    batch_sizes: tuple[int, ...] = (1, 8)  # latency is measured at each
    gen_tokens: int = 32  # decode steps per timed generation
    repeats: int = 5  # timed rounds per batch size
    warmup: int = 1  # untimed rounds before them
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0  # torch intra-op threads while timing; 0 leaves torch's setting
    measure_memory: bool = True  # a child process per model; off saves seconds per model
    engine: str = "torch"  # llama.cpp: each model exported to GGUF and timed there, one sequence at a time
    gguf_type: str = "f16"  # llama.cpp only: the exported weights' type

    def validate(self) -> ProfileOptions:
        """Self, or InvalidArgument naming the first bad field."""
        for field in ("seq_len", "gen_tokens", "repeats"):
            _require(getattr(self, field) > 0, field, f"{field} must be positive, got {getattr(self, field)}")
        _require(self.warmup >= 0, "warmup", f"warmup must be zero or more, got {self.warmup}")
        _require(self.threads >= 0, "threads", f"threads must be zero (torch's default) or more, got {self.threads}")
        _require(len(self.batch_sizes) > 0, "batch_sizes", "give at least one batch size")
        bad = [size for size in self.batch_sizes if size <= 0]
        _require(not bad, "batch_sizes", f"batch sizes must be positive, got {list(self.batch_sizes)}")
        _require(len(set(self.batch_sizes)) == len(self.batch_sizes), "batch_sizes", f"batch sizes repeat: {list(self.batch_sizes)}")
        for field, kind in (("seq_len", "seq_len"), ("gen_tokens", "gen_tokens"), ("repeats", "repeats"), ("warmup", "repeats")):
            check_limit(kind, getattr(self, field), field)
        check_limit("batch_size", max(self.batch_sizes), "batch_sizes")
        check_limit("batch_size", len(self.batch_sizes), "batch_sizes (count)")
        torch_dtype(self.dtype)
        check_device(self.device)
        _require(self.engine in ENGINES, "engine", f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        _require(self.gguf_type in GGUF_TYPES, "gguf_type", f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {self.gguf_type!r}")
        if self.engine == "llama.cpp":
            _require(self.batch_sizes == (1,), "batch_sizes", f"llama.cpp serves one sequence at a time: batch size 1, got {list(self.batch_sizes)}")
            _require(self.device == "cpu", "device", f"llama.cpp is timed on the CPU here, got device {self.device!r}")
        return self


def default_batch_sizes(engine: str) -> tuple[int, ...]:
    """Batch sizes when none are asked for: llama.cpp decodes one sequence at a time."""
    return (1,) if engine == "llama.cpp" else ProfileOptions.batch_sizes


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}", field="dtype")
    return DTYPES[name]


def check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidArgument(f"device must be cpu or cuda[:N], got {name!r}", field="device") from None
    _require(device.type in ("cpu", "cuda"), "device", f"device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"device {name!r} asked for, but this machine has no usable GPU", field="device")


def _require(condition: bool, field: str, reason: str) -> None:
    if not condition:
        raise InvalidArgument(reason, field=field)
