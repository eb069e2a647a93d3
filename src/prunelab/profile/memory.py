"""Peak memory to load a model and run one forward pass, each model measured in a
fresh Python process.

Why a fresh process on every device: in the profiler's own process the numbers would
include whatever it already holds (the model under test, the baseline, allocator
caches that make a second load look nearly free). A child process measures from a
known start: after its imports, before the load.

- CPU: peak RSS increase, the kernel's high-water mark of the process's memory
  (VmHWM in /proc/self/status) minus the RSS (psutil) just before loading. It counts
  every page the process touched: weights (safetensors are memory-mapped, so a
  weight counts once read), loader buffers, activations, the temporary copies of a
  dtype conversion. Not `ru_maxrss`: Linux carries it over from the parent through
  fork and exec, so a child of a profiler holding several models would report the
  parent's size.
- GPU: `torch.cuda.max_memory_allocated` (tensors) and `max_memory_reserved` (what the
  caching allocator took from the driver); the CUDA context itself is in neither.

The child runs `prunelab.profile.memory_probe`, which prints one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import psutil
import torch

from prunelab.models import load_model, resolve_model
from prunelab.profile.options import torch_dtype

CPU_METHOD = "peak RSS increase in a fresh process (VmHWM - RSS before load)"
CUDA_METHOD = "torch.cuda.max_memory_allocated / max_memory_reserved in a fresh process"


@dataclass(frozen=True)
class MemoryProfile:
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    peak_bytes: int  # the headline figure: RSS increase on CPU, max allocated on GPU
    reserved_bytes: int | None  # GPU only
    weights_bytes: int  # parameters and buffers as loaded, for comparison
    method: str


def measure_memory(spec: str, *, seq_len: int, batch_size: int, dtype: str, device: str) -> MemoryProfile:
    """Peak memory of `spec`, measured in a child process. Callers measure one model at
    a time: two big ones at once could exhaust memory that one at a time fits in."""
    command = [sys.executable, "-m", "prunelab.profile.memory_probe", spec, "--seq-len", str(seq_len)]
    command += ["--batch-size", str(batch_size), "--dtype", dtype, "--device", device]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"memory measurement of {spec} failed (exit {child.returncode}): {child.stderr.strip()[-2000:]}")
    return MemoryProfile(**json.loads(child.stdout.strip().splitlines()[-1]))


def measure_in_this_process(spec: str, *, seq_len: int, batch_size: int, dtype: str, device: str) -> MemoryProfile:
    """The child's measurement; meaningful only in a process that has loaded no model yet."""
    on_cuda = torch.device(device).type == "cuda"
    resolve_model(spec)  # a first use may convert or download: not part of loading
    rss_before = psutil.Process().memory_info().rss
    loaded = load_model(spec, dtype=torch_dtype(dtype), device=device)
    model = loaded.model
    input_ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device=model.device)
    with torch.inference_mode():
        model(input_ids=input_ids, use_cache=False)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if on_cuda:
        torch.cuda.synchronize(device)
        peak, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    else:
        peak, reserved = _peak_rss() - rss_before, None
    return MemoryProfile(
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        peak_bytes=peak,
        reserved_bytes=reserved,
        weights_bytes=weights,
        method=CUDA_METHOD if on_cuda else CPU_METHOD,
    )


def _peak_rss() -> int:
    """This process's own RSS high-water mark, in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("/proc/self/status has no VmHWM line: peak RSS is measured on Linux only")
