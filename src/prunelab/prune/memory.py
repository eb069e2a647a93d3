"""Peak memory of a job: CUDA's max allocated on GPU, the process's RSS on CPU.

ru_maxrss is the peak of the whole process's life, which in a long-running service
says nothing about one job; a sampling thread measures the peak between enter and
exit instead (every 10 ms: allocations that live shorter than that are missed)."""

from __future__ import annotations

import threading

import psutil
import torch

SAMPLE_SECONDS = 0.01


class PeakMemory:
    def __init__(self, device: str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "rss"
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            process = psutil.Process()
            self.peak_bytes = process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, process: psutil.Process) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)
