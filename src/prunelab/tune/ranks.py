"""Data-parallel tuning over several processes (torchrun), by hand over torch.distributed.

Each optimizer step's examples are dealt out to the ranks (rank r takes examples r,
r + world, ... of every micro-batch), each rank backpropagates its share of the loss
divided by the step's labelled tokens over all ranks, and the gradients are summed
with all_reduce: the update is the one a single process would take on the whole
step (same global batch), up to the order of float additions. DDP does the same
all_reduce, but averages where this sums, and cannot follow a step whose shares hold
unequal token counts; the summed form keeps one process and many bit-for-bit alike in
what they mean. Validation is dealt out the same way and its sums reduced.

The teacher and the student are replicated on every rank (each GPU holds both); a
model too large for one GPU would need FSDP, which this does not do. Rank 0 alone
writes snapshots, reports progress and publishes; every rank reads a snapshot to
resume. LoRA dropout draws differ between ranks, so runs with dropout match a
single process in distribution, not exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """This process's place in the initialised process group; one rank of one without a group."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world-th one from its rank on."""
        return list(items[self.rank :: self.world])

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks."""
        if self.world == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Every parameter's gradient summed over the ranks, in place, one tensor at a
        time (no second copy of all gradients); a rank whose share was empty adds zeros."""
        if self.world == 1:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


ONE_PROCESS = Ranks()


def device_of_rank(device: str) -> str:
    """Under torchrun, "cuda" means this rank's own GPU (LOCAL_RANK)."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


@contextmanager
def process_group(device: str) -> Iterator[Ranks]:
    """The process group torchrun describes (WORLD_SIZE > 1), set up for the block:
    nccl on GPUs, gloo on CPUs. `device` is this rank's (device_of_rank). Outside
    torchrun, one rank of one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield Ranks.current()
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield Ranks.current()
    finally:
        dist.destroy_process_group()
