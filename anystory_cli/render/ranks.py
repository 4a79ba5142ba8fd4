"""Several processes (torchrun / accelerate launch): joining the process group and sharing the
panels out. Rank r of W draws the panels r, r + W, r + 2W, ... of rank 0's list."""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import AnyStoryError


def _process_group():
    """torch.distributed, joined (gloo) if nobody has joined it yet."""
    import torch
    import torch.distributed as dist

    world = os.environ.get("WORLD_SIZE")
    if not dist.is_available():
        raise AnyStoryError(f"WORLD_SIZE={world}, but this torch build has no torch.distributed; "
                            "run one process")
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if torch.cuda.is_available() and not os.environ.get("ANYSTORY_DEVICE"):
            torch.cuda.set_device(local_rank % torch.cuda.device_count())  # one GPU per process
        try:
            dist.init_process_group("gloo")
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AnyStoryError(f"WORLD_SIZE={world}: cannot join the other processes ({reason}); "
                                "start them with torchrun --nproc-per-node N, or unset WORLD_SIZE") from None
        atexit.register(_leave_process_group)
    return dist


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class Ranks:
    """This process's place among the processes of one render. Rank r of W draws the panels
    r, r + W, r + 2W, ... of rank 0's list of panels to draw; rank 0 composes the pages once
    every rank has finished. One process: rank 0 of 1, and nothing to coordinate."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @staticmethod
    def launched() -> int:
        """How many processes the launcher (torchrun, accelerate launch) started: WORLD_SIZE, 1
        when unset or unreadable. Read without torch."""
        try:
            return int(os.environ.get("WORLD_SIZE", "1") or 1)
        except ValueError:
            return 1

    @classmethod
    def current(cls) -> "Ranks":
        if cls.launched() <= 1:
            return cls()
        dist = _process_group()
        return cls(dist.get_rank(), dist.get_world_size())

    def _flags(self, values: Iterable[int], count: int):
        import torch
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flags = torch.zeros(count, dtype=torch.int64, device=device)
        for value in values:
            flags[value] = 1
        return flags

    def share(self, indices: Sequence[int], count: int) -> list[int]:
        """Rank 0's `indices` (0 <= i < count), on every rank."""
        if self.world == 1:
            return list(indices)
        import torch.distributed as dist

        flags = self._flags(indices if self.rank == 0 else (), count)
        dist.broadcast(flags, src=0)
        return [i for i in range(count) if flags[i]]

    def mine(self, todo: Sequence[Any]) -> list[Any]:
        return list(todo[self.rank::self.world])

    def gather(self, failed: bool, indices: Sequence[int], count: int) -> tuple[bool, list[int]]:
        """(did any rank fail, the union of every rank's `indices`); waits for every rank."""
        if self.world == 1:
            return failed, list(indices)
        import torch.distributed as dist

        flags = self._flags([0] * failed + [1 + i for i in indices], count + 1)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), [i for i in range(count) if flags[1 + i]]
