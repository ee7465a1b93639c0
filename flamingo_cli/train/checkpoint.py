"""Checkpoints through torch.distributed.checkpoint: written whole or not at all, last K kept.

Layout: `<run_dir>/checkpoints/step-00000120/` holds the DCP files (model subset, optimizer,
scheduler, progress), `rank<r>.json` per rank (data-loader position, RNG states), the recipe,
and `COMPLETE`, written last. Local checkpoints are also written under a hidden temporary name
and renamed; a directory without `COMPLETE` is never resumed from.

Loading reads through `runtime.dcp_metadata` (nothing in a directory is unpickled unchecked)
and checks before it loads: files whole, and the model (and for a resume the optimizer,
schedule and progress) fitting this run; each failure names the file or keys and a fix.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.stateful import Stateful

from flamingo_cli.errors import CheckpointDamaged, FlamingoError
from flamingo_cli.runtime.dcp_metadata import CheckpointReader, fit, flatten, load
from flamingo_cli.runtime.distributed import DistInfo, any_rank
from flamingo_cli.runtime.run_dir import COMPLETE, checkpoint_dir, list_checkpoints
from flamingo_cli.runtime.weights import MODEL_PREFIX, does_not_fit, single_process_ok


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
    try:
        with single_process_ok():
            dcp_save({"train": state}, checkpoint_id=str(tmp), no_dist=info.world_size == 1)
    except CheckpointException as exc:
        if any(isinstance(error, KeyboardInterrupt) for error, _ in exc.failures.values()):
            # a second Ctrl-C while saving aborts as it does anywhere else (DCP wraps it)
            raise KeyboardInterrupt from None
        raise
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


def _damaged_fix(path: Path) -> str:
    """What to do about a damaged checkpoint of a run: resume from the previous one."""
    older = sorted(
        p for p in path.parent.glob("step-*") if p.name < path.name and (p / COMPLETE).is_file()
    )
    if older:
        return (
            f"delete {path} (or move it aside) and run again to resume from {older[-1]}, "
            f'or set run.resume = "{older[-1]}"'
        )
    return (
        f"delete {path} (or move it aside) to start the run over, or set run.resume to "
        "another checkpoint directory"
    )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointDamaged(f"{file} is missing: the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointDamaged(f"{file} is damaged: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointDamaged(f"{file} is damaged: not the JSON object flamingo writes")
    return data


def _rank_state(path: Path, info: DistInfo) -> dict[str, Any] | None:
    """This rank's saved state (loader positions, RNG), None when the world size changed."""
    meta = _read_json(path / "meta.json")
    if not isinstance(meta.get("world_size"), int):
        raise CheckpointDamaged(f"{path / 'meta.json'} is damaged: it has no world_size")
    if meta["world_size"] != info.world_size:
        return None
    rank_file = path / f"rank{info.rank}.json"
    state = _read_json(rank_file)
    if not isinstance(state.get("loaders"), dict) or not isinstance(state.get("rng"), dict):
        raise CheckpointDamaged(f"{rank_file} is damaged: it has no loader positions or RNG")
    return state


def _prune_unset_optimizer_state(template: dict[str, Any], index: Metadata) -> None:
    """Drop the template's optimizer state of parameters the checkpoint has none for: they
    had no gradient yet when it was saved (a backbone output no loss reaches), so AdamW had
    made no state for them, and after the load they have none either, as in the saved run."""
    state = template["train"]["optim"]["state"]
    entries = index.state_dict_metadata
    for name in list(state):
        keys = [f"train.optim.state.{name}.{k}" for k in flatten(state[name])]
        if keys and not any(k in entries for k in keys):
            del state[name]


def _check_resume_fit(path: Path, template: dict[str, Any], index: Metadata) -> None:
    """The model part must match exactly (same trainable set, layout and shapes); the rest
    (optimizer, schedule, progress) must have every entry the template asks for."""
    flat = flatten(template)
    model = fit({k: v for k, v in flat.items() if k.startswith(MODEL_PREFIX)}, index, MODEL_PREFIX)
    recipe = path / "recipe.toml"
    if not model.ok:
        raise FlamingoError(
            does_not_fit(path, "model", model.missing, model.unexpected, model.reshaped),
            fix=f"resume with the model settings it was trained with ({recipe}: "
            "model.cross_attn_every_n_layers, the language model and vision encoder, "
            "train_backbones, freeze_lm_embeddings), or start a new run from its weights "
            f'with model.init_from = "{path}"',
        )
    rest = fit({k: v for k, v in flat.items() if not k.startswith(MODEL_PREFIX)}, index, "train.")
    if rest.missing or rest.reshaped:
        raise FlamingoError(
            does_not_fit(path, "run", rest.missing, [], rest.reshaped)
            + ": the optimizer, schedule or datasets differ",
            fix=f"resume with the recipe it was saved with ({recipe}), or start a new run "
            f'from its weights with model.init_from = "{path}"',
        )


def _prepare_resume(
    path: Path, state: TrainState, info: DistInfo
) -> tuple[dict[str, Any] | None, CheckpointReader, dict[str, Any]]:
    reader = CheckpointReader(path)
    index = reader.index()
    rank_state = _rank_state(path, info)
    template = {"train": state.state_dict()}
    _prune_unset_optimizer_state(template, index)
    _check_resume_fit(path, template, index)
    return rank_state, reader, template


def load_checkpoint(path: Path, state: TrainState, info: DistInfo) -> dict[str, Any] | None:
    """Load into `state`; return this rank's saved state, or None when the world size changed.

    Checks first, so nothing half-loads: the directory's files are whole and were written by
    flamingo (nothing in it is unpickled unchecked), and the model, optimizer, schedule and
    progress fit this run. Collective: every rank calls it, and all raise when one does."""
    try:
        rank_state, reader, template = _prepare_resume(path, state, info)
    except FlamingoError as exc:
        any_rank(True, info)
        if isinstance(exc, CheckpointDamaged):
            raise CheckpointDamaged(exc.message, fix=_damaged_fix(path)) from None
        raise
    if any_rank(False, info):
        raise FlamingoError(
            f"another rank could not load the checkpoint {path}",
            fix="see that rank's error in the run's per-rank logs",
        )
    try:
        with single_process_ok():
            load(template, reader, no_dist=info.world_size == 1)
    except CheckpointDamaged as exc:
        raise CheckpointDamaged(exc.message, fix=_damaged_fix(path)) from None
    state.load_state_dict(template["train"])
    return rank_state
