"""`flamingo quickstart`: generate data, convert, inspect, validate, train, evaluate, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flamingo_cli.cli.common import JsonOption, command, user_errors


def register(app: typer.Typer) -> None:
    command(app, "quickstart")(quickstart)


def quickstart(
    directory: Annotated[
        Path,
        typer.Option(
            "--dir",
            file_okay=False,
            help="Working directory (created; an earlier quickstart in it is replaced).",
        ),
    ] = Path("flamingo-quickstart"),
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", dir_okay=False, help="The tiny recipe (default: recipes/tiny-cpu.toml)."
        ),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """The whole path on a CPU in a few minutes, offline: show that the model learns to use images.

    Generates a raw MMC4-format corpus and captioned images whose captions name the shape and colour shown, converts and inspects them, validates and trains the tiny recipe, then evaluates held-out samples with and without images. Exit 0 when the images lower the held-out caption loss by at least 0.3 nats per token, 1 otherwise.
    """
    from flamingo_cli.quickstart import STAGES, run_quickstart, train_run
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.eval_view import EvalDisplay
    from flamingo_cli.ui.quickstart_view import StageLines, render_quickstart
    from flamingo_cli.ui.train_view import TrainDisplay

    with user_errors(json_):
        lines = StageLines(STAGES, enabled=not json_)
        run_name, run_dir = train_run(directory, recipe)
        with (
            TrainDisplay(enabled=not json_, run_name=run_name, run_dir=run_dir) as train_view,
            EvalDisplay(enabled=not json_) as eval_view,
        ):
            result = run_quickstart(
                directory,
                recipe=recipe,
                on_stage=lines.started,
                on_stage_done=lines.finished,
                train_events=train_view,
                eval_events=eval_view,
            )
        if json_:
            ui.print_json(result.to_dict())
        else:
            render_quickstart(result)
        if not result.passed:
            raise typer.Exit(1)
