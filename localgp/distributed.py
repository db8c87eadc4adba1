"""torch.distributed for the commands `torchrun` launches (`localgp train`, `decode`, `transcribe`):
one process per GPU (or per CPU share), on one machine or several.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in each process's environment; `setup` joins the
process group they describe. Launched plainly (no torchrun, or one process), everything here is
a no-op for rank 0 of a world of one, so the commands run as they always did.

Errors: a user error found by rank 0 alone (a refused run directory or output) is sent to every
rank (`on_main`), so that no process waits forever for one that stopped; torchrun stops the
other processes when one exits with an error.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from localgp.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """This process's place among the processes of a command: rank `rank` of `world`, computing
    on `device` (with several GPUs, the one of its local rank)."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes logs, checkpoints and merged outputs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether there are other processes to talk to."""
        return self.world > 1


def is_main_process() -> bool:
    """Rank 0 of the process group this process joined, or a process that joined none."""
    return not dist.is_initialized() or dist.get_rank() == 0


def launched_world() -> int:
    """The number of processes torchrun started (1 when launched plainly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from err


def setup(device: torch.device, field: str = "--device", backend: str | None = None,
          timeout: datetime.timedelta | None = None) -> Context:
    """This process's Context, joining torchrun's process group when there is one. Backend: NCCL
    for CUDA, Gloo for the CPU (unless `backend` is given). With several processes, device "cuda"
    becomes each process's own GPU, cuda:LOCAL_RANK; a GPU named by its index is refused, as
    every process would take that one. Ranks other than 0 log warnings only."""
    world = launched_world()
    if world <= 1:
        return Context(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"{field}: {device} names one GPU, but torchrun starts {world} processes: give 'cuda' "
                            f"and each process takes the GPU of its local rank")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), timeout=timeout)
        atexit.register(_leave)
    rank = dist.get_rank()
    if rank != 0:  # rank 0 reports for all
        logging.getLogger("localgp").setLevel(logging.WARNING)
    return Context(rank, dist.get_world_size(), device)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def on_main(ctx: Context, fn: Callable[[], T]) -> T:
    """fn() run by rank 0 alone (what writes to shared files), its result given to every rank.
    A UserError it raises is raised on every rank, anything else as a RuntimeError there."""
    if not ctx.active:
        return fn()
    outcome: list = [None]
    error = None
    if ctx.main:
        try:
            outcome = [("ok", fn())]
        except UserError as err:
            outcome, error = [("user", str(err))], err
        except BaseException as err:
            outcome, error = [("bug", f"{type(err).__name__}: {err}")], err
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    kind, value = outcome[0]
    if kind == "user":
        raise UserError(value)
    if kind == "bug":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def sum_over_ranks(ctx: Context, values: list[float]) -> list[float]:
    """The element-wise sums of every rank's `values` (the same length everywhere)."""
    if not ctx.active:
        return list(values)
    # NCCL reduces only tensors on the GPU; Gloo takes either
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(ctx: Context, value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not ctx.active:
        return [value]
    values: list = [None] * ctx.world
    dist.all_gather_object(values, value)
    return values


def any_rank(ctx: Context, flag: bool) -> bool:
    """Whether `flag` is true on some rank: decisions every rank must take together."""
    return sum_over_ranks(ctx, [float(flag)])[0] > 0


def shard(count: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of `count` items, shares differing in size by one at most."""
    return range(count * rank // world, count * (rank + 1) // world)


def balance(costs: list[float], world: int) -> list[list[int]]:
    """The indices of `costs` dealt out to `world` ranks so that their sums come out close:
    the costliest first, each to the rank with the least so far (LPT); each rank's in order."""
    loads, shares = [0.0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += costs[i]
        shares[rank].append(i)
    return [sorted(share) for share in shares]


def main_first(ctx: Context, fn: Callable[[], T]) -> T:
    """fn() on every rank, rank 0 first: it may write what the others then read (a tokenizer it
    trains). An error of rank 0's stops every rank, as on_main's."""
    kept = []
    on_main(ctx, lambda: kept.append(fn()))
    return kept[0] if ctx.main else fn()
