"""Several processes through ``torch.distributed`` (``torchrun``): one home for what every command needs of it.

``torchrun --nproc-per-node N -m megan_fast train|upscale|eval ...`` starts N
copies of the command with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set;
each joins one process group (NCCL between GPUs, gloo on CPUs), uses its
own device (``cuda:LOCAL_RANK``) and takes its share of the work
(docs/DESIGN.md section 8).  A single process is a world of one: every
helper here then does nothing.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from megan_fast.errors import MeganFastError

__all__ = ["PeerLost", "World", "finish_processes", "init_processes"]


class PeerLost(MeganFastError, RuntimeError):
    """Another process of the run stopped (it was killed, or failed): the others stop too, one line each."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def mine(self, index: int) -> bool:
        """Whether work item ``index`` (of a list every process builds the same way) is this process's."""
        return index % self.size == self.rank

    def barrier(self) -> None:
        """Waits for every process; :class:`PeerLost` if one of them is gone."""
        if self.distributed:
            try:
                dist.barrier()
            except RuntimeError as exc:
                raise PeerLost(f"another process of the run stopped ({str(exc).splitlines()[0][:100]}); "
                               "run the same command again to resume") from None

    def gather(self, value) -> list:
        """Every process's ``value``, in rank order (on every process)."""
        if not self.distributed:
            return [value]
        values = [None] * self.size
        try:
            dist.all_gather_object(values, value)
        except RuntimeError as exc:
            raise PeerLost(f"another process of the run stopped ({str(exc).splitlines()[0][:100]}); "
                           "run the same command again to resume") from None
        return values

    def broadcast(self, value):
        """Rank 0's ``value``, on every process."""
        return self.gather(value)[0]


def init_processes(device: str | None) -> tuple[World, torch.device]:
    """(this process's :class:`World`, its torch.device): under ``torchrun`` (``WORLD_SIZE`` > 1) the process
    group is joined, and a CUDA device is ``cuda:LOCAL_RANK`` unless ``device`` names another one."""
    distributed = dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
    world = World(dist.get_rank(), dist.get_world_size()) if distributed else World()
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # "cuda": this process's GPU
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return world, dev


def finish_processes(ok: bool) -> None:
    """Leaves the process group at the end of a command (all processes first meet, when they all got there
    without a failure), so that no process exits while another still talks to it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if ok:
            dist.barrier()
        dist.destroy_process_group()
    except RuntimeError:  # a process already gone: nothing left to close
        pass
