"""Several processes (torchrun / a PyTorchJob): the world, sharding, gathers and the cross-rank SigLIP loss.

How a distributed JEST step runs (train.py):
  - every rank reads the same stream (same seed), so the super-batch and the data position are the
    same on all ranks and independent of the world size: a checkpoint resumes on any number of ranks;
  - the super-batch [B] is sharded: rank r scores rows shard(B, r) with the learner;
  - selection scope `global`: the learner's scoring *embeddings* are gathered ([B, d], never a [B, B]
    matrix), every rank runs the same selection with the same generator and gets the same indices,
    which equal a single process's; scope `local`: each rank selects b / world of its own shard, with
    no gather (cheaper, but pairs across shards are never scored together);
  - rank r trains on rows shard(b, r) of the selected sub-batch; the sigmoid loss puts its images
    against every rank's texts (gathered with autograd), so the global [b, b] matrix exists on no
    device, and DDP averages the gradients.
One process (WORLD_SIZE unset or 1) is the same code with every collective a no-op.
"""

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flexi_jest.device import resolve_device


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_name: str = "auto") -> tuple[World, torch.device]:
    """The world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and this
    rank's device: cuda:LOCAL_RANK with NCCL where CUDA is available (and asked for), else the CPU with gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size)
    return World(rank, size, local_rank), device


def check_divisible(name: str, value: int, world: World) -> None:
    """Batches are split evenly over ranks; say which setting does not divide."""
    if value % world.size:
        raise ValueError(f"{name} = {value} is not divisible by the number of processes ({world.size}); "
                         f"choose a multiple of {world.size}")


def shard(n: int, world: World) -> slice:
    """This rank's rows of a batch of n (n divisible by the world size)."""
    per_rank = n // world.size
    return slice(world.rank * per_rank, (world.rank + 1) * per_rank)


def gather_rows(x: Tensor, world: World) -> Tensor:
    """[n, ...] on every rank -> [world * n, ...] in rank order, on every rank (no autograd)."""
    if not world.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_rows_with_grad(x: Tensor, world: World) -> Tensor:
    """As gather_rows, differentiable: the backward sums every rank's gradient for this rank's rows."""
    if not world.distributed:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x.contiguous()))


def exchange_rows(local: Tensor, wanted: Tensor, world: World) -> Tensor:
    """Rows of a batch sharded over ranks, delivered to the ranks that want them, without any rank holding the batch.

    local: this rank's rows [n, ...] of a global batch [world * n, ...] (rank r holds rows shard(world * n, r));
    wanted: global row indices [world * m], the same on every rank; rank r receives rows wanted[shard(world * m, r)].
    Returns [m, ...] = global[wanted[shard(world * m, rank)]], in that order (one all-to-all of the rows).
    """
    if not world.distributed:
        return local[wanted.to(local.device)]
    n = local.shape[0]
    wanted = wanted.cpu()
    per_rank = wanted.numel() // world.size
    owner = wanted // n  # [world * m]
    destination = torch.arange(wanted.numel()) // per_rank
    send = (owner == world.rank).nonzero().squeeze(1)  # positions in wanted that this rank owns, by destination
    send_rows = wanted[send] - world.rank * n
    send_sizes = [int((destination[send] == d).sum()) for d in range(world.size)]
    mine = shard(wanted.numel(), world)
    my_owners = owner[mine]
    order = torch.argsort(my_owners, stable=True)  # what arrives, by source rank, in wanted order within each
    receive_sizes = [int((my_owners == s).sum()) for s in range(world.size)]
    received = torch.empty((per_rank, *local.shape[1:]), dtype=local.dtype, device=local.device)
    dist.all_to_all_single(received, local[send_rows.to(local.device)].contiguous(), receive_sizes, send_sizes)
    result = torch.empty_like(received)
    result[order.to(local.device)] = received
    return result


def gather_objects(value: Any, world: World) -> list[Any]:
    """Every rank's value (any picklable object), in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def sum_over_ranks(value: Tensor, world: World) -> Tensor:
    """The sum of a tensor over ranks (no autograd), e.g. each rank's share of the loss."""
    if not world.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def broadcast_object(value: Any, world: World) -> Any:
    """Rank 0's value (any picklable object) on every rank, e.g. the digest of the model only rank 0 wrote."""
    if not world.distributed:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(barrier: bool = False) -> None:
    """Leave the process group (end of a torchrun process). barrier: first wait until every rank is done with its
    collectives (a clean end; a rank tearing gloo down early can abort a peer still finishing). Never after an
    error, when another rank may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or the only process; from the environment, before or without a process group."""
    return int(os.environ.get("RANK", "0")) == 0
