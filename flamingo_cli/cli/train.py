"""`flamingo train`: validate, show the plan, then train here, as a rank, or through torchrun.

The ranks torchrun starts run this same command (`python -m flamingo_cli train RECIPE ...`,
with the hidden `--launched`), see that they are ranks, and train."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from flamingo_cli.cli.common import (
    AllowPipeOption,
    NnodesOption,
    NprocOption,
    SetOption,
    command,
    recipe_overrides,
    user_errors,
)

if TYPE_CHECKING:
    from flamingo_cli.recipe.load import LoadedRecipe, Override
    from flamingo_cli.recipe.validate import ValidationReport
    from flamingo_cli.ui.train_view import TrainDisplay


def register(app: typer.Typer) -> None:
    command(app, "train")(train)


_RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML file.", dir_okay=False)]

_NodeRankOption = Annotated[
    int | None,
    typer.Option("--node-rank", min=0, help="This node's rank (default: NODE_RANK, SLURM_NODEID)."),
]

_RdzvOption = Annotated[
    str | None,
    typer.Option(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="c10d rendezvous of a multi-node run (default: MASTER_ADDR:MASTER_PORT).",
    ),
]

_MaxStepsOption = Annotated[
    int | None,
    typer.Option(
        "--max-steps", min=1, help="Stop after this many optimizer steps, with a checkpoint."
    ),
]

_TakeOverOption = Annotated[
    bool,
    typer.Option(
        "--take-over",
        help="Take the run directory's lock from a run you know is gone (its host "
        "or job died); a lock whose process is gone or whose heartbeat stopped is "
        "taken over without it.",
    ),
]

_LaunchedOption = Annotated[
    bool,
    typer.Option(
        "--launched",
        hidden=True,
        help="A rank `flamingo train` started: its launcher validated the recipe, showed "
        "the plan and reports the end.",
    ),
]


_EventsOption = Annotated[
    Path | None,
    typer.Option(
        "--events",
        hidden=True,
        help="A rank `flamingo train` started on a terminal: rank 0 appends its training "
        "events here as JSON lines, for the launcher's live view.",
    ),
]


def train(
    recipe: _RecipeArg,
    set_: SetOption = None,
    nproc_per_node: NprocOption = None,
    nnodes: NnodesOption = None,
    allow_pipe: AllowPipeOption = False,
    node_rank: _NodeRankOption = None,
    rdzv_endpoint: _RdzvOption = None,
    max_steps: _MaxStepsOption = None,
    take_over: _TakeOverOption = False,
    launched: _LaunchedOption = False,
    events: _EventsOption = None,
) -> None:
    """Train a recipe: one process in place, several through torchrun (FSDP2/DDP).

    SIGTERM, SIGUSR1 or Ctrl-C (to the process or its whole process group) makes every rank
    save a checkpoint at the next step boundary and exit 0; a second Ctrl-C aborts without
    saving. Rerunning resumes from the newest complete checkpoint (run.resume = "auto"). A run
    directory belongs to one run at a time (its lock file, run.lock): a second start on it
    stops, naming the run that holds it.
    """
    from flamingo_cli.runtime.launch import started_by_launcher
    from flamingo_cli.runtime.precision import require_gpu_for_fp16

    with user_errors():
        overrides = recipe_overrides(set_, nproc_per_node, nnodes, allow_pipe=allow_pipe)
        if launched:
            loaded = _loaded(recipe, overrides)
            _train_as_rank(loaded, max_steps, take_over, report=False, events=events)
            return
        report = _validated(recipe, overrides)
        require_gpu_for_fp16(report.loaded.recipe.run.precision)
        world = report.loaded.recipe.distributed.world_size
        if started_by_launcher(world):
            _train_as_rank(report.loaded, max_steps, take_over, report=True)
            return
        _show_plan(report, recipe)
        if world == 1:
            _train_as_rank(report.loaded, max_steps, take_over, report=True)
            return
        rank_args = _rank_args(recipe, set_, nproc_per_node, nnodes, allow_pipe, max_steps)
        _launch_ranks(report.loaded, rank_args, node_rank, rdzv_endpoint, take_over)


def _loaded(recipe: Path, overrides: list[Override]) -> LoadedRecipe:
    from flamingo_cli.recipe.load import load_recipe

    return load_recipe(recipe, overrides)


def _validated(recipe: Path, overrides: list[Override]) -> ValidationReport:
    """The recipe checked for training here; its problems shown, exit 1 on an error."""
    from flamingo_cli.recipe.validate import validate_recipe
    from flamingo_cli.ui.errors import render_problems

    report = validate_recipe(recipe, overrides, training=True)
    render_problems(report.problems)
    if not report.ok:
        raise typer.Exit(1)
    return report


def _show_plan(report: ValidationReport, recipe: Path) -> None:
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.plan import render_plan

    if ui.settings.verbosity >= 0:
        render_plan(report.plan, title=f"Plan for {recipe}")


def _train_as_rank(
    loaded: LoadedRecipe,
    max_steps: int | None,
    take_over: bool,
    *,
    report: bool,
    events: Path | None = None,
) -> None:
    """Train as this process's rank; `report`: say where it ended (a launcher says it else);
    `events`: where rank 0 sends its events for the launcher's live view (instead of showing
    them itself)."""
    from flamingo_cli.monitor.events import EventWriter
    from flamingo_cli.runtime.run_dir import run_dir_of
    from flamingo_cli.train.run import train_rank
    from flamingo_cli.ui import console as ui

    try:
        with EventWriter(events) if events else _display(loaded) as display:
            outcome = train_rank(loaded, display, max_steps=max_steps, take_over=take_over)
    except KeyboardInterrupt:
        _aborted(run_dir_of(loaded))
    if report:
        where = outcome.last_checkpoint or outcome.run_dir
        state = "stopped" if outcome.stopped_early else "finished"
        ui.info(f"{state} at step {outcome.step}/{outcome.total_steps}; checkpoint: {where}")


def _display(loaded: LoadedRecipe) -> TrainDisplay:
    """The training display of this run: live on a terminal, plain lines otherwise."""
    from flamingo_cli.runtime.run_dir import run_dir_of
    from flamingo_cli.ui.train_view import TrainDisplay

    return TrainDisplay(run_name=loaded.recipe.run.name, run_dir=run_dir_of(loaded))


def _rank_args(
    recipe: Path,
    set_: list[str] | None,
    nproc_per_node: int | None,
    nnodes: int | None,
    allow_pipe: bool,
    max_steps: int | None,
) -> list[str]:
    """The user's arguments for the ranks' own `flamingo train` (without the rendezvous)."""
    args = ["train", str(recipe.resolve()), "--launched"]
    args += [arg for s in set_ or [] for arg in ("--set", s)]
    args += ["--nproc-per-node", str(nproc_per_node)] if nproc_per_node else []
    args += ["--nnodes", str(nnodes)] if nnodes else []
    args += ["--allow-pipe"] if allow_pipe else []
    args += ["--max-steps", str(max_steps)] if max_steps is not None else []
    return args


def _launch_ranks(
    loaded: LoadedRecipe,
    rank_args: list[str],
    node_rank: int | None,
    endpoint: str | None,
    take_over: bool,
) -> NoReturn:
    """Start this node's ranks through torchrun; exit with its code."""
    from flamingo_cli.runtime.launch import ABORTED, rendezvous_for, torchrun_command
    from flamingo_cli.runtime.run_dir import run_dir_of
    from flamingo_cli.ui import console as ui

    rdzv = rendezvous_for(loaded.recipe, node_rank=node_rank, endpoint=endpoint)
    if take_over and rdzv.nnodes > 1:
        rank_args = [*rank_args, "--take-over"]  # rank 0 takes the lock, on whichever node
    log_dir = run_dir_of(loaded) / "logs"
    with _events_file(rdzv.nnodes) as events:
        if events is not None:
            rank_args = [*rank_args, "--events", str(events)]
        cmd = torchrun_command(rdzv, rank_args, log_dir)
        ui.detail(" ".join(cmd))
        with _watching(loaded, events):
            code = _launch(cmd, run_dir_of(loaded), rdzv.nnodes, take_over)
    if code == ABORTED:
        _aborted(run_dir_of(loaded))
    if code != 0:
        ui.err_console.print(
            f"[bold red]error[/]: training failed (exit {code}); per-rank logs and error "
            f"files are under {log_dir}"
        )
    raise typer.Exit(code)


@contextmanager
def _events_file(nnodes: int) -> Iterator[Path | None]:
    """Where rank 0 sends its events when this launcher shows the live view: on a terminal,
    not -q, on one node (across nodes rank 0 may run elsewhere; its log has the lines)."""
    import shutil
    import tempfile

    from flamingo_cli.ui import console as ui

    if nnodes > 1 or not ui.console.is_terminal or ui.settings.verbosity < 0:
        yield None
        return
    work = Path(tempfile.mkdtemp(prefix="flamingo-train-"))
    try:
        yield work / "events.jsonl"
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _watching(loaded: LoadedRecipe, events: Path | None) -> Iterator[None]:
    """While torchrun runs: rank 0's events replayed into this process's live view."""
    if events is None:
        yield
        return
    from flamingo_cli.monitor.events import EventFollower

    with _display(loaded) as display:
        follower = EventFollower(events, display).start()
        try:
            yield
        finally:
            follower.stop()


def _launch(cmd: list[str], run_dir: Path, nnodes: int, take_over: bool) -> int:
    """Run torchrun. On one node this process holds the run directory's lock and its ranks
    find its token in their environment; across nodes rank 0 takes it, wherever it runs."""
    import os

    from flamingo_cli.runtime.launch import run_torchrun
    from flamingo_cli.runtime.run_lock import TOKEN_ENV, acquire_run_lock
    from flamingo_cli.ui import console as ui

    if nnodes > 1:
        return run_torchrun(cmd)
    with acquire_run_lock(run_dir, take_over=take_over) as lock:
        if lock.took_over:
            ui.info(lock.took_over)
        return run_torchrun(cmd, env={**os.environ, TOKEN_ENV: lock.holder.token})


def _aborted(run_dir: Path) -> NoReturn:
    from flamingo_cli.runtime.launch import ABORTED
    from flamingo_cli.runtime.run_dir import list_checkpoints
    from flamingo_cli.ui import console as ui

    saved = list_checkpoints(run_dir)
    where = f"from {saved[-1].path}" if saved else "from the start (no checkpoint yet)"
    ui.err_console.print(f"aborted by a second Ctrl-C, without saving; a rerun resumes {where}")
    raise typer.Exit(ABORTED)
