"""Checkpoints through torch.distributed.checkpoint: written whole or not at all, last K kept.

Layout: `<run_dir>/checkpoints/step-00000120/` holds the DCP files (model subset, optimizer,
scheduler, progress), `rank<r>.json` per rank (data-loader position, RNG states), the recipe,
and `COMPLETE`, written last. Local checkpoints are also written under a hidden temporary name
and renamed; a directory without `COMPLETE` is never resumed from.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.stateful import Stateful

from flamingo_cli.errors import FlamingoError
from flamingo_cli.train.distributed import DistInfo

COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"


class TrainState(Stateful):
    """Model (the parameters a checkpoint keeps), optimizer, scheduler and progress for DCP."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        keep: Callable[[str], bool],
        progress: dict[str, int],
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.keep = keep
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {
            "model": {k: v for k, v in model_sd.items() if self.keep(k)},
            "optim": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "progress": dict(self.progress),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=StateDictOptions(strict=False),
        )
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.progress.update(state_dict["progress"])


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first; partial ones are ignored."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith("step-") and (path / COMPLETE).is_file():
            try:
                found.append(CheckpointInfo(path, int(path.name.removeprefix("step-"))))
            except ValueError:
                continue
    return sorted(found, key=lambda c: c.step)


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: newest complete for "auto", none for "none", else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1].path if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FlamingoError(
            f"run.resume points at {path}, which is not a complete checkpoint",
            fix='give a checkpoint directory that contains COMPLETE, or resume = "auto"',
        )
    return path


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is what we mean then."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, str]:
    """This process's torch RNG states, base64 encoded for JSON."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def set_rng_state(states: dict[str, str]) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(states["cpu"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(states["cuda"]))


def save_checkpoint(
    run_dir: Path,
    step: int,
    state: TrainState,
    rank_state: dict[str, Any],
    info: DistInfo,
    *,
    recipe_text: str,
    keep_last: int,
) -> Path:
    """Save on every rank; returns the final directory. Collective: all ranks must call it."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in (tmp, final):
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir()
    _barrier(info)
    with _single_process_ok():
        dcp_save({"train": state}, checkpoint_id=str(tmp), no_dist=info.world_size == 1)
    (tmp / f"rank{info.rank}.json").write_text(json.dumps(rank_state), encoding="utf-8")
    _barrier(info)
    if info.is_main:
        (tmp / "recipe.toml").write_text(recipe_text, encoding="utf-8")
        meta = {"step": step, "world_size": info.world_size, **state.progress}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        (tmp / COMPLETE).write_text("", encoding="utf-8")
        tmp.rename(final)
        if keep_last > 0:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old.path, ignore_errors=True)
    _barrier(info)
    return final


def load_checkpoint(path: Path, state: TrainState, info: DistInfo) -> dict[str, Any] | None:
    """Load into `state`; return this rank's saved state, or None when the world size changed."""
    with _single_process_ok():
        dcp_load({"train": state}, checkpoint_id=str(path), no_dist=info.world_size == 1)
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    rank_file = path / f"rank{info.rank}.json"
    if meta.get("world_size") != info.world_size or not rank_file.is_file():
        return None
    loaded: dict[str, Any] = json.loads(rank_file.read_text(encoding="utf-8"))
    return loaded


def load_model_weights(model: nn.Module, keep: set[str], path: Path) -> None:
    """Load only the model part of a checkpoint directory into an unwrapped model, on any
    number of processes (each reads what it needs; no collective). For `init_from` and eval."""
    if not (path / COMPLETE).is_file():
        raise FlamingoError(
            f"{path} is not a complete flamingo checkpoint (no {COMPLETE} marker)",
            fix="pick a directory under <run>/checkpoints/ that has COMPLETE, or 'latest'",
        )
    state = {k: v for k, v in model.state_dict().items() if k in keep}
    with _single_process_ok():
        dcp_load({"train": {"model": state}}, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state, strict=False)
