"""Several processes through torch.distributed, launched by torchrun (or `srun torchrun`).

    torchrun --nproc_per_node 2 sophon_orig/stage2_train/algo.py ...        # one machine, 2 GPUs (or cores)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 ...   # 2 machines

The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on CUDA with
`cuda:LOCAL_RANK`, gloo on CPU. Without torchrun everything here is a no-op for a world of one, so the
single-process path runs the same code. Rank 0 alone writes files; the others compute and wait.
"""
import ctypes
import ctypes.util
import datetime
import os
import signal

import torch
import torch.distributed as dist

from common.cli import UsageError
from common.train import resolve_device

# A rank may wait at a collective while rank 0 alone runs a long fine-tune probe or writes plots.
TIMEOUT = datetime.timedelta(hours=2)


class World:
    """This process's place among the ranks (a world of one without torchrun)."""

    def __init__(self, rank=0, size=1, local_rank=0):
        self.rank, self.size, self.local_rank = rank, size, local_rank

    @property
    def main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1

    def device(self, name):
        """--device under torchrun: each rank takes its own GPU (cuda:LOCAL_RANK)."""
        device = resolve_device(name)
        if device.type == "cuda" and self.distributed:
            if self.local_rank >= torch.cuda.device_count():
                raise UsageError(f"local rank {self.local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                                 f"use --nproc_per_node {torch.cuda.device_count()} at most")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    # ---- collectives (identity in a world of one) ------------------------------------------------

    def sum_(self, tensors):
        """In-place sum of each tensor over the ranks, as one flat all-reduce (tensors of one dtype)."""
        if not self.distributed:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def any(self, flag):
        """True on every rank if it is True on any (e.g. an interrupt seen by one rank)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def share(self, obj):
        """Rank 0's `obj` on every rank (any picklable object)."""
        if not self.distributed:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, device=_collective_device())
        return box[0]

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensors):
        """Rank 0's values in place on every rank."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t, src=0)

    def barrier(self):
        if self.distributed:
            dist.barrier()


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_WORLD = World()


def world():
    return _WORLD


def init_from_env(device_name="auto"):
    """Join the process group torchrun describes (nothing without it); returns the World."""
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or dist.is_initialized():
        return _WORLD
    die_with_parent()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _WORLD = World(rank, size, local_rank)
    if not cuda:  # ranks share the machine's cores instead of oversubscribing them
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    return _WORLD


def shutdown():
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def die_with_parent():
    """A worker whose launcher is killed outright (SIGKILL, the OOM killer) would run on as an orphan,
    holding its GPU and writing files: on Linux, ask the kernel to kill it too."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request
        os._exit(1)
