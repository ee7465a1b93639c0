"""A run's directory as both training and evaluation read it: where it is, and its complete
checkpoints (`<run_dir>/checkpoints/step-N/` holding `COMPLETE`, written last)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flamingo_cli.errors import FlamingoError
from flamingo_cli.recipe.load import LoadedRecipe

COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"


def run_dir_of(loaded: LoadedRecipe) -> Path:
    """`run.output_dir / run.name`: checkpoints, metrics, logs and the lock live there."""
    return Path(loaded.recipe.run.output_dir) / loaded.recipe.run.name


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint directory and the step it was saved at."""

    path: Path
    step: int


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
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
