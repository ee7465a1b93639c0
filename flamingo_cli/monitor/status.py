"""`flamingo status`: what a run directory says about its run, wherever it was written.

Read only: `metrics.jsonl` (complete lines; a half-written last one is ignored), the complete
checkpoints (`checkpoints/step-N/` with `COMPLETE`), the recipe kept in the newest one (for the
total number of steps), `FINISHED`, and the lock `run.lock` with its heartbeat (running: a lock
whose holder is not stale, per runtime/run_lock.py). Works on a copied directory, an
interrupted run and one being written. See docs/formats.md §15.
"""

from __future__ import annotations

import datetime
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flamingo_cli.errors import FlamingoError
from flamingo_cli.monitor.live import RunWatch, dataset_names, held_out, number
from flamingo_cli.monitor.metrics_file import MetricsTail
from flamingo_cli.recipe.schema import Recipe
from flamingo_cli.runtime.run_dir import COMPLETE, list_checkpoints
from flamingo_cli.runtime.run_lock import LOCK_FILE, LockHolder, read_lock, stale_reason

METRICS_FILE = "metrics.jsonl"  # train/metrics.py METRICS_FILE (that module is not read here)
FINISHED = "FINISHED"  # train/run.py FINISHED: written with the last step when a run ends
RECIPE_FILE = "recipe.toml"  # the recipe each checkpoint keeps, as the run resolved it
PACE_ROWS = 20  # logged steps whose throughput gives the pace for the ETA

State = Literal["running", "finished", "stopped"]
Curve = list[tuple[int, float]]


class NoRun(FlamingoError):
    """The path given to `flamingo status` holds no run."""


@dataclass(frozen=True)
class SavedCheckpoint:
    """A complete checkpoint: its step, size on disk and when it was completed (COMPLETE's
    modification time, seconds since the epoch)."""

    path: Path
    step: int
    size: int
    saved_at: float

    def to_dict(self) -> dict[str, Any]:
        saved = datetime.datetime.fromtimestamp(self.saved_at, datetime.UTC)
        return {
            "step": self.step,
            "path": str(self.path),
            "bytes": self.size,
            "saved_at": saved.isoformat(),
        }


def _saved(path: Path, step: int) -> SavedCheckpoint | None:
    try:
        at = (path / COMPLETE).stat().st_mtime
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:  # removed meanwhile (keep_last)
        return None
    return SavedCheckpoint(path, step, size, at)


def saved_checkpoints(run_dir: Path) -> list[SavedCheckpoint]:
    """Every complete checkpoint of a run, oldest first."""
    found = (_saved(c.path, c.step) for c in list_checkpoints(run_dir))
    return [c for c in found if c is not None]


def newest_checkpoint(run_dir: Path) -> SavedCheckpoint | None:
    """The newest complete checkpoint, or None."""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        saved = _saved(checkpoint.path, checkpoint.step)
        if saved is not None:
            return saved
    return None


@dataclass(frozen=True)
class RunStatus:
    """What `flamingo status` shows, and what `--json` prints (`to_dict`)."""

    run_dir: Path
    state: State
    detail: str
    holder: LockHolder | None
    watch: RunWatch
    total_steps: int | None
    eta_s: float | None
    checkpoints: list[SavedCheckpoint]
    train_curves: dict[str, Curve]
    held_out_curves: dict[str, Curve]
    bad_lines: int = 0
    partial_line: bool = False
    now: float = 0.0
    recipe: Path | None = None

    @property
    def step(self) -> int | None:
        return self.watch.step if self.watch.rows else None

    def to_dict(self) -> dict[str, Any]:
        datasets = {
            d.name: {
                "loss": d.last,
                "smoothed_loss": d.smoothed,
                "samples_per_s": d.samples_per_s,
                "tokens_per_s": d.tokens_per_s,
                "dropped": d.dropped,
                "held_out_loss": d.held_out,
            }
            for d in self.watch.datasets.values()
        }
        data = {
            "run_dir": str(self.run_dir),
            "state": self.state,
            "detail": self.detail,
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.watch.epoch,
            "eta_s": self.eta_s,
            "recipe": str(self.recipe) if self.recipe else None,
            "datasets": datasets,
            "last_metrics": self.watch.last or None,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "held_out": _held_out_rows(self.held_out_curves),
            "loss": {name: [list(p) for p in curve] for name, curve in self.train_curves.items()},
            "held_out_loss": {
                name: [list(p) for p in curve] for name, curve in self.held_out_curves.items()
            },
            "ignored_lines": self.bad_lines,
            "partial_last_line": self.partial_line,
        }
        return data


def _held_out_rows(curves: dict[str, Curve]) -> list[dict[str, Any]]:
    """Held-out losses by step: `[{"step": 8, "loss": {"laion": 5.7, ...}}, ...]`."""
    steps: dict[int, dict[str, float]] = {}
    for name, curve in curves.items():
        for step, loss in curve:
            steps.setdefault(step, {})[name] = loss
    return [{"step": step, "loss": steps[step]} for step in sorted(steps)]


def run_dir_for(target: Path) -> tuple[Path, Recipe | None, Path | None]:
    """The run directory `target` names (itself, or a recipe's `run.output_dir/run.name`), the
    recipe when one was given, and its path."""
    if target.is_dir():
        return target, None, None
    if not target.exists():
        raise NoRun(
            f"{target} does not exist",
            fix="give a run directory (run.output_dir/run.name, e.g. runs/NAME) or the "
            "recipe that trained it",
        )
    if target.suffix.lower() != ".toml":
        raise NoRun(
            f"{target} is a file, not a run directory or a recipe (.toml)",
            fix="give a run directory (run.output_dir/run.name, e.g. runs/NAME) or the "
            "recipe that trained it",
        )
    from flamingo_cli.recipe.load import load_recipe

    recipe = load_recipe(target).recipe
    run_dir = Path(recipe.run.output_dir) / recipe.run.name
    if not run_dir.is_dir():
        raise NoRun(
            f"the run directory of {target}, {run_dir}, does not exist: the run has not "
            "started, or started with other run.output_dir/run.name overrides",
            fix=f"start it with flamingo train {target}, or give the run directory itself",
        )
    return run_dir, recipe, target


@dataclass
class StatusReader:
    """Reads a run directory's status; kept across refreshes (`--follow`), it reads only the
    metrics lines written since the last read."""

    run_dir: Path
    recipe: Recipe | None = None
    recipe_path: Path | None = None
    _tail: MetricsTail | None = None
    _totals: dict[Path, int | None] = field(default_factory=dict)

    def read(self, now: float) -> RunStatus:
        run_dir = self.run_dir
        if self._tail is not None and not run_dir.is_dir():  # was there on the first read
            raise NoRun(
                f"{run_dir} is gone: it was removed or moved while status read it",
                fix="give the run directory where it is now",
            )
        if self._tail is None:
            self._tail = MetricsTail(run_dir / METRICS_FILE)
        self._tail.read()
        rows = self._tail.read_so_far
        holder = read_lock(run_dir)
        checkpoints = saved_checkpoints(run_dir)
        finished = _finished_step(run_dir)
        if not rows.rows and not checkpoints and holder is None and finished is None:
            _require_run(run_dir)
        watch, train, evals = _fold(rows.rows)
        recipe = self.recipe or self._kept_recipe(checkpoints)
        total = _total_steps(recipe) if recipe is not None else None
        if total is None and finished is not None:
            total = finished
        watch.total_steps = total
        state, detail = _state(holder, finished, watch, checkpoints, now)
        eta = _eta(watch, recipe, total) if state == "running" else None
        return RunStatus(
            run_dir=run_dir,
            state=state,
            detail=detail,
            holder=holder,
            watch=watch,
            total_steps=total,
            eta_s=eta,
            checkpoints=checkpoints,
            train_curves=train,
            held_out_curves=evals,
            bad_lines=rows.bad_lines,
            partial_line=rows.partial_line,
            now=now,
            recipe=self.recipe_path or (checkpoints[-1].path / RECIPE_FILE if recipe else None),
        )

    def _kept_recipe(self, checkpoints: list[SavedCheckpoint]) -> Recipe | None:
        """The recipe kept with the newest checkpoint (None when there is none it can read)."""
        if not checkpoints:
            return None
        from flamingo_cli.recipe.load import load_recipe

        try:
            return load_recipe(checkpoints[-1].path / RECIPE_FILE).recipe
        except FlamingoError:  # missing, or of another version of the schema
            return None


def _require_run(run_dir: Path) -> None:
    """Raise NoRun unless `run_dir` holds a metrics file or a lock (maybe still empty)."""
    if not (run_dir / METRICS_FILE).exists() and not (run_dir / LOCK_FILE).exists():
        raise NoRun(
            f"{run_dir} holds no flamingo run: no {METRICS_FILE}, complete checkpoint, "
            f"{LOCK_FILE} or {FINISHED}",
            fix="give the run directory (run.output_dir/run.name, e.g. runs/NAME) or "
            "the recipe that trained it; a run writes metrics from its first step",
        )


def read_status(target: Path, now: float) -> RunStatus:
    """The status of the run `target` names (a run directory or a recipe)."""
    run_dir, recipe, path = run_dir_for(target)
    return StatusReader(run_dir, recipe, path).read(now)


def _fold(rows: list[dict[str, Any]]) -> tuple[RunWatch, dict[str, Curve], dict[str, Curve]]:
    """The rows folded into a watch (one row per step: a repeated step keeps its last row),
    and the train and held-out loss curves per dataset."""
    by_step = {int(row["step"]): row for row in rows}
    watch = RunWatch()
    train: dict[str, Curve] = {}
    evals: dict[str, Curve] = {}
    for step in sorted(by_step):
        row = by_step[step]
        watch.add(step, row)
        for name in dataset_names(row):
            loss = number(row, f"loss/{name}")
            if loss is not None:
                train.setdefault(name, []).append((step, loss))
        for name, loss in held_out(row).items():
            evals.setdefault(name, []).append((step, loss))
    return watch, train, evals


def _finished_step(run_dir: Path) -> int | None:
    try:
        text = (run_dir / FINISHED).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isascii() and text.isdigit() else 0


def _total_steps(recipe: Recipe) -> int | None:
    from flamingo_cli.recipe.plan import make_plan

    try:
        return make_plan(recipe).total_optimizer_steps
    except (FlamingoError, ValueError, ZeroDivisionError):
        return None


def _state(
    holder: LockHolder | None,
    finished: int | None,
    watch: RunWatch,
    checkpoints: list[SavedCheckpoint],
    now: float,
) -> tuple[State, str]:
    """running (a live lock), finished (FINISHED) or stopped, with the words that say so."""
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    stale = stale_reason(holder, moment) if holder is not None else None
    if holder is not None and stale is None:
        return "running", f"running: {holder.describe(moment)}"
    if finished is not None:
        return "finished", f"finished at step {finished or watch.step}"
    step = watch.step if watch.rows else (checkpoints[-1].step if checkpoints else 0)
    detail = f"stopped at step {step}"
    if checkpoints:
        detail += f"; a rerun resumes from the checkpoint of step {checkpoints[-1].step}"
    else:
        detail += "; no complete checkpoint: a rerun starts from the beginning"
    if holder is not None and stale is not None:
        detail += f" (its lock is stale: {stale})"
    return "stopped", detail


def _eta(watch: RunWatch, recipe: Recipe | None, total: int | None) -> float | None:
    """Seconds left at the median throughput of the last logged steps: rank 0's samples per
    optimizer step over its samples/s (evaluation and checkpoint time not counted)."""
    if recipe is None or total is None or not watch.last:
        return None
    per_step = sum(c.batch_size for c in recipe.datasets().values())
    per_step *= recipe.optim.gradient_accumulation_steps
    rates = [r for r in list(watch.rates)[-PACE_ROWS:] if r > 0]
    if not rates or per_step <= 0:
        return None
    return per_step / statistics.median(rates) * max(total - watch.step, 0)
