"""`flamingo train`: validate, show the plan, then train here, as a rank, or through torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flamingo_cli.cli.common import (
    AllowPipeOption,
    NnodesOption,
    NprocOption,
    SetOption,
    recipe_overrides,
    user_errors,
)


def register(app: typer.Typer) -> None:
    app.command("train")(train)


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
) -> None:
    """Train a recipe: one process in place, several through torchrun (FSDP2/DDP).

    SIGTERM or SIGUSR1 makes every rank save a checkpoint at the next step boundary and exit 0;
    rerunning resumes from the newest complete checkpoint (run.resume = "auto").
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

        from flamingo_cli.train.launch import (
            rendezvous_for,
            run_torchrun,
            started_by_launcher,
            torchrun_command,
        )
        from flamingo_cli.train.run import check_device_support, run_dir_of, train_rank

        loaded = report.loaded
        check_device_support(loaded.recipe.run.precision)
        world = loaded.recipe.distributed.world_size
        if started_by_launcher(world) or world == 1:
            if ui.settings.verbosity >= 0 and not started_by_launcher(world):
                render_plan(report.plan, title=f"Plan for {recipe}")
            from flamingo_cli.ui.train_view import TrainDisplay

            with TrainDisplay() as display:
                outcome = train_rank(loaded, display, max_steps=max_steps)
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
        log_dir = run_dir_of(loaded) / "logs"
        cmd = torchrun_command(rdzv, recipe.resolve(), worker_args, log_dir)
        ui.detail(" ".join(cmd))
        code = run_torchrun(cmd)
        if code != 0:
            ui.err_console.print(
                f"[bold red]error[/]: training failed (exit {code}); per-rank logs and error "
                f"files are under {log_dir}"
            )
        raise typer.Exit(code)


def _toml(value: object) -> str:
    """An override value written back as TOML so the ranks parse it to the same thing."""
    from flamingo_cli.recipe.toml_write import dumps

    return dumps({"v": value}).strip().removeprefix("v = ")
