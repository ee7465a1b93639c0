"""Process-group set-up and teardown, and sharding applied from outside the model."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from flamingo_cli.errors import FlamingoError
from flamingo_cli.recipe.schema import Precision, Sharding, Strategy

T = TypeVar("T")

if TYPE_CHECKING:
    from flamingo_cli.model.flamingo import FlamingoModel


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ranks, node layout, device and backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def world_from_env() -> tuple[int, int, int, int]:
    """(rank, world, local rank, local world) from torchrun's variables, else srun's, else 1 process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return (
            int(env["RANK"]),
            world,
            int(env.get("LOCAL_RANK", "0")),
            int(env.get("LOCAL_WORLD_SIZE", str(world))),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        return (
            int(env["SLURM_PROCID"]),
            world,
            int(env.get("SLURM_LOCALID", "0")),
            int(env.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0]),
        )
    return 0, 1, 0, 1


def init_distributed(timeout_s: int) -> DistInfo:
    """Join the process group (nccl on GPUs, gloo on CPUs) when there is more than one rank."""
    rank, world, local_rank, local_world = world_from_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise FlamingoError(
                "MASTER_ADDR is not set for a multi-process run",
                fix="launch with `flamingo train` or torchrun, or export MASTER_ADDR and "
                "MASTER_PORT in your srun script",
            )
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank, world, local_rank, local_world, device, backend)


def teardown() -> None:
    """Leave the process group cleanly: a barrier first, or gloo may abort at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def apply_parallelism(
    model: nn.Module,
    units: Sequence[nn.Module],
    *,
    strategy: Strategy,
    sharding: Sharding,
    precision: Precision,
    info: DistInfo,
    compiled: Sequence[nn.Module] = (),
) -> nn.Module:
    """Wrap `model` for its strategy: FSDP2 per unit then the root, DDP, or nothing. The
    `compiled` blocks are compiled first, each in place (regional compilation: one compiled
    block serves all its copies; the parameter names do not change)."""
    for block in compiled:
        block.compile()
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if sharding == "hybrid":
            mesh = init_device_mesh(
                info.device.type,
                (info.nnodes, info.local_world_size),
                mesh_dim_names=("replicate", "shard"),
            )
        else:
            mesh = init_device_mesh(info.device.type, (info.world_size,))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if precision == "bf16"
            else MixedPrecisionPolicy()
        )
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    if strategy == "ddp" and info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    return model


def repeated_blocks(model: FlamingoModel) -> list[nn.Module]:
    """The blocks `run.compile` compiles: the vision tower's blocks, the perceiver's layers and
    the decoder layers, each with its gated cross-attention (docs/formats.md §12)."""
    blocks: list[nn.Module] = []
    for unit in model.shard_units():
        if unit is model.perceiver:
            blocks.extend(model.perceiver.layers)
        else:
            blocks.append(unit)
    return blocks


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run a backward with or without gradient reduction (one reduction per optimizer step)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when any rank's flag is true (one small all-reduce)."""
    if info.world_size == 1 or not dist.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gathered(value: T, info: DistInfo) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank (collective: all ranks
    call it at the same point)."""
    if info.world_size == 1 or not dist.is_initialized():
        return [value]
    values: list[T | None] = [None] * info.world_size
    dist.all_gather_object(values, value)
    return cast(list[T], values)


def mean_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The mean of each value over all ranks (every rank must call it with the same keys)."""
    if info.world_size == 1 or not dist.is_initialized() or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return {k: float(v) / info.world_size for k, v in zip(keys, tensor.tolist(), strict=True)}
