"""`flamingo train`: validate, show the plan, then train here, as a rank, or through torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

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


def register(app: typer.Typer) -> None:
    command(app, "train")(train)


def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.", dir_okay=False)],
    set_: SetOption = None,
    nproc_per_node: NprocOption = None,
    nnodes: NnodesOption = None,
    allow_pipe: AllowPipeOption = False,
    node_rank: Annotated[
        int | None,
        typer.Option(
            "--node-rank", min=0, help="This node's rank (default: NODE_RANK, SLURM_NODEID)."
        ),
    ] = None,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option(
            "--rdzv-endpoint",
            metavar="HOST:PORT",
            help="c10d rendezvous of a multi-node run (default: MASTER_ADDR:MASTER_PORT).",
        ),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps", min=1, help="Stop after this many optimizer steps, with a checkpoint."
        ),
    ] = None,
    take_over: Annotated[
        bool,
        typer.Option(
            "--take-over",
            help="Take the run directory's lock from a run you know is gone (its host "
            "or job died); a lock whose process is gone or whose heartbeat stopped is "
            "taken over without it.",
        ),
    ] = False,
) -> None:
    """Train a recipe: one process in place, several through torchrun (FSDP2/DDP).

    SIGTERM, SIGUSR1 or Ctrl-C (to the process or its whole process group) makes every rank
    save a checkpoint at the next step boundary and exit 0; a second Ctrl-C aborts without
    saving. Rerunning resumes from the newest complete checkpoint (run.resume = "auto"). A run
    directory belongs to one run at a time (its lock file, run.lock): a second start on it
    stops, naming the run that holds it.
    """
    from flamingo_cli.recipe.validate import validate_recipe
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.errors import render_problems
    from flamingo_cli.ui.plan import render_plan

    with user_errors():
        overrides = recipe_overrides(set_, nproc_per_node, nnodes, allow_pipe=allow_pipe)
        report = validate_recipe(recipe, overrides, training=True)
        render_problems(report.problems)
        if not report.ok:
            raise typer.Exit(1)

        from flamingo_cli.runtime.launch import (
            ABORTED,
            rendezvous_for,
            started_by_launcher,
            torchrun_command,
        )
        from flamingo_cli.runtime.precision import require_gpu_for_fp16
        from flamingo_cli.runtime.run_dir import run_dir_of
        from flamingo_cli.train.run import train_rank

        loaded = report.loaded
        require_gpu_for_fp16(loaded.recipe.run.precision)
        world = loaded.recipe.distributed.world_size
        if started_by_launcher(world) or world == 1:
            if ui.settings.verbosity >= 0 and not started_by_launcher(world):
                render_plan(report.plan, title=f"Plan for {recipe}")
            from flamingo_cli.ui.train_view import TrainDisplay

            try:
                with TrainDisplay() as display:
                    outcome = train_rank(loaded, display, max_steps=max_steps, take_over=take_over)
            except KeyboardInterrupt:
                _aborted(run_dir_of(loaded))
            where = outcome.last_checkpoint or outcome.run_dir
            state = "stopped" if outcome.stopped_early else "finished"
            ui.info(f"{state} at step {outcome.step}/{outcome.total_steps}; checkpoint: {where}")
            return
        if ui.settings.verbosity >= 0:
            render_plan(report.plan, title=f"Plan for {recipe}")
        rdzv = rendezvous_for(loaded.recipe, node_rank=node_rank, endpoint=rdzv_endpoint)
        worker_args = [arg for o in overrides for arg in ("--set", f"{o.key}={_toml(o.value)}")]
        if max_steps is not None:
            worker_args += ["--max-steps", str(max_steps)]
        if take_over and rdzv.nnodes > 1:
            worker_args += ["--take-over"]  # rank 0 takes the lock, on whichever node it is
        log_dir = run_dir_of(loaded) / "logs"
        cmd = torchrun_command(rdzv, recipe.resolve(), worker_args, log_dir)
        ui.detail(" ".join(cmd))
        code = _launch(cmd, run_dir_of(loaded), rdzv.nnodes, take_over)
        if code == ABORTED:
            _aborted(run_dir_of(loaded))
        if code != 0:
            ui.err_console.print(
                f"[bold red]error[/]: training failed (exit {code}); per-rank logs and error "
                f"files are under {log_dir}"
            )
        raise typer.Exit(code)


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


def _toml(value: object) -> str:
    """An override value written back as TOML so the ranks parse it to the same thing."""
    from flamingo_cli.recipe.toml_write import dumps

    return dumps({"v": value}).strip().removeprefix("v = ")
