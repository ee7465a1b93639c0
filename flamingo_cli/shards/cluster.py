"""Spreading per-file work over machines: which part a node takes, and the Ray engine.

A node's part is every input whose position in the expanded spec, modulo the node count, is
its rank: stable whatever the file sizes or the order in which files are found. The node
count and rank come from, in this order: --num-nodes/--node-rank, a Slurm array
(SLURM_ARRAY_TASK_*), a Slurm job step (SLURM_NTASKS/SLURM_PROCID), torchrun
(WORLD_SIZE/RANK); otherwise the node is alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from flamingo_cli.errors import UsageError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Partition:
    """This node's share of the inputs: positions p with p % count == rank."""

    count: int = 1
    rank: int = 0
    source: str = "single"  # flags, slurm-array, slurm, torchrun, single

    @property
    def split(self) -> bool:
        """Whether other nodes take part (then the manifest is assembled by a merge)."""
        return self.count > 1

    def select(self, items: Sequence[T]) -> list[T]:
        return list(items[self.rank :: self.count])

    def to_dict(self) -> dict[str, object]:
        return {"count": self.count, "rank": self.rank, "source": self.source}


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UsageError(
                f"{name} is not set, but the other Slurm array variables are",
                fix="pass --num-nodes and --node-rank explicitly",
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(
            f"environment variable {name}={raw!r} is not an integer",
            fix="unset it or pass --num-nodes and --node-rank explicitly",
        ) from None


def _slurm_array(env: Mapping[str, str]) -> Partition:
    task_id = _int(env, "SLURM_ARRAY_TASK_ID")
    low = _int(env, "SLURM_ARRAY_TASK_MIN")
    step = _int(env, "SLURM_ARRAY_TASK_STEP", 1)
    count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    offset = task_id - low
    if step < 1 or offset < 0 or offset % step or offset // step >= count:
        raise UsageError(
            f"the Slurm array is not a range: task {task_id} of min {low}, step {step}, "
            f"count {count}",
            fix="submit a range such as --array=0-99 or 0-198:2, or pass --num-nodes and "
            "--node-rank",
        )
    return Partition(count, offset // step, "slurm-array")


def resolve_partition(
    num_nodes: int | None = None,
    node_rank: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Partition:
    """This node's share from the flags, else Slurm array, Slurm step, torchrun variables."""
    env = os.environ if env is None else env
    if num_nodes is not None or node_rank is not None:
        if num_nodes is None or node_rank is None:
            raise UsageError(
                "--num-nodes and --node-rank go together",
                fix="pass both, e.g. --num-nodes 8 --node-rank 3",
            )
        found = Partition(num_nodes, node_rank, "flags")
    elif env.get("SLURM_ARRAY_TASK_ID"):
        found = _slurm_array(env)
    elif env.get("SLURM_NTASKS") and env.get("SLURM_PROCID"):
        found = Partition(_int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"), "slurm")
    elif env.get("WORLD_SIZE") and env.get("RANK"):
        found = Partition(_int(env, "WORLD_SIZE"), _int(env, "RANK"), "torchrun")
    else:
        return Partition()
    if found.count < 1 or not 0 <= found.rank < found.count:
        raise UsageError(
            f"node rank {found.rank} is not in 0..{found.count - 1} (from {found.source})",
            fix="the rank must be at least 0 and below the node count",
        )
    return found


@dataclass(frozen=True)
class RayOptions:
    """Run on a Ray cluster at `address` (None: a new local instance, or RAY_ADDRESS)."""

    address: str | None = None
    num_cpus: int | None = None  # of a new local instance


def import_ray() -> Any:
    """The `ray` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise UsageError(
            f"--ray needs the Ray package, which is not installed ({exc})",
            fix="pip install 'flamingo[ray]'",
        ) from None
    return ray


def ray_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    options: RayOptions,
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """`fn` applied to every item, one Ray task each; results in item order.

    Joins the Ray instance already started in this process, else starts or connects to one
    (and shuts it down afterwards). `on_result(index, result)` runs as each task finishes.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        local = options.address in (None, "", "local") and not os.environ.get("RAY_ADDRESS")
        ray.init(
            address=None if options.address in (None, "", "local") else options.address,
            num_cpus=options.num_cpus if local else None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        started = True
    try:
        remote = ray.remote(num_cpus=1)(fn)
        index = {remote.remote(item): i for i, item in enumerate(items)}
        results: dict[int, R] = {}
        pending = list(index)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                for ref in done:
                    results[index[ref]] = ray.get(ref)
                    if on_result is not None:
                        on_result(index[ref], results[index[ref]])
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return [results[i] for i in range(len(items))]
    finally:
        if started:
            ray.shutdown()
