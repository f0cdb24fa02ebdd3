"""Distributed set-up for torchrun, in one place (importing pgolf never touches CUDA or NCCL).

`setup()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK, picks NCCL on CUDA and gloo on the CPU,
and returns a `Dist` context; a plain single process gets world size 1 and no process group.
"""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # "nccl", "gloo" or None (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    want = device or os.environ.get("PGOLF_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    backend = None
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    elif dist.is_initialized():
        backend = dist.get_backend()
    return Dist(rank, world, local, dev, backend)


def teardown() -> None:
    """Destroy the process group, then collect garbage while the interpreter is whole: gloo work
    objects caught in reference cycles otherwise die during interpreter shutdown, where a gloo
    thread aborts the process ("terminate called without an active exception", SIGABRT, about
    one exit in ten on torch 2.13 CPU) after the run's results are already written."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def leave(code: int) -> NoReturn:
    """End a process's entry point with `code`. A torchrun worker (WORLD_SIZE > 1) flushes its output
    and leaves without the interpreter's shutdown: gloo threads still abort a finished worker there
    now and then, after teardown() (SIGABRT after the run was written: one CI failure in session 4),
    and torchrun then reports the whole job as failed. Everything a run writes is closed (and
    fsynced) before this; a single process exits the ordinary way."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean_(tensors: list[torch.Tensor], per_dtype: bool = False) -> None:
    """Average tensors across ranks in place: one flat all-reduce in the promoted dtype, or with `per_dtype`
    one per dtype, each summed in its own (#1855 averages a bf16 gradient in bf16). The sum is scaled by
    1/world afterwards; NCCL's AVG scales each input first, the same thing for 2^k ranks (exact scaling)."""
    if dist.is_available() and dist.is_initialized():
        groups = [[t for t in tensors if t.dtype == d] for d in dict.fromkeys(t.dtype for t in tensors)] \
            if per_dtype else [tensors]  # dtypes in order of appearance: the same on every rank
        for g in groups:
            all_reduce_sum_(g, scale=1.0 / dist.get_world_size())


def all_reduce_sum_(tensors: list[torch.Tensor], scale: float = 1.0) -> None:
    """Sum tensors across ranks in place (times `scale`), as one flat all-reduce."""
    if not (dist.is_available() and dist.is_initialized()) or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    if scale != 1.0:
        flat *= scale
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (e.g. a run directory named from the clock)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true on any rank (so every rank stops on the same step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
