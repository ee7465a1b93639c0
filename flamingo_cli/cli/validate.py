"""`flamingo validate-config`: check a recipe and print the resolved plan, no torch needed."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from flamingo_cli.cli.common import (
    AllowPipeOption,
    JsonOption,
    NnodesOption,
    NprocOption,
    SetOption,
    command,
    recipe_overrides,
    user_errors,
)


def register(app: typer.Typer) -> None:
    command(app, "validate-config")(validate_config)


def validate_config(
    recipe: Annotated[
        Path | None,
        typer.Argument(help="Recipe TOML file.", show_default=False, dir_okay=False),
    ] = None,
    set_: SetOption = None,
    nproc_per_node: NprocOption = None,
    nnodes: NnodesOption = None,
    allow_pipe: AllowPipeOption = False,
    check_shards: Annotated[
        bool,
        typer.Option(
            "--check-shards",
            help="Count samples (sizes.json, else tar headers) and compare with the epoch size.",
        ),
    ] = False,
    from_openflamingo: Annotated[
        str | None,
        typer.Option(
            "--from-openflamingo",
            metavar="COMMAND",
            help="Translate an OpenFlamingo train.py command line into a recipe and check it.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", dir_okay=False, help="With --from-openflamingo: write the recipe here."
        ),
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Check a training recipe before any GPU time is spent and print the resolved plan.

    Every problem is reported at once with its TOML key and line. Exit 0 when the recipe is
    valid (warnings allowed), 1 when it has errors, 2 on usage errors.
    """
    from flamingo_cli.errors import Problem, ProblemsFound, UsageError
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.errors import render_problems
    from flamingo_cli.ui.plan import render_plan

    with user_errors(json_):
        if (recipe is None) == (from_openflamingo is None):
            raise UsageError(
                "give either a RECIPE file or --from-openflamingo COMMAND",
                fix="flamingo validate-config recipes/tiny-cpu.toml",
            )
        if out is not None and from_openflamingo is None:
            raise UsageError("--out only applies with --from-openflamingo")
        overrides = recipe_overrides(set_, nproc_per_node, nnodes, allow_pipe=allow_pipe)

        with contextlib.ExitStack() as stack:
            import_problems: list[Problem] = []
            if from_openflamingo is not None:
                from flamingo_cli.recipe.openflamingo import recipe_from_openflamingo

                imported = recipe_from_openflamingo(from_openflamingo)
                import_problems = imported.problems
                if out is None:
                    if not json_:
                        ui.console.out(imported.toml, highlight=False)
                    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flamingo-")))
                    out = tmp / "openflamingo-import.toml"
                out.write_text(imported.toml, encoding="utf-8")
                recipe = out

            from flamingo_cli.recipe.validate import validate_recipe

            assert recipe is not None
            try:
                report = validate_recipe(recipe, overrides, check_shards=check_shards)
            except ProblemsFound as found:
                if not json_:
                    raise
                problems = [*import_problems, *found.problems]
                ui.print_json(
                    {
                        "recipe": str(recipe),
                        "ok": False,
                        "problems": [p.to_dict() for p in problems],
                    }
                )
                raise typer.Exit(1) from None
        problems = [*import_problems, *report.problems]
        ok = report.ok and not any(p.severity == "error" for p in import_problems)
        if json_:
            data = report.to_dict()
            data["ok"] = ok
            data["problems"] = [p.to_dict() for p in problems]
            ui.print_json(data)
        else:
            if ui.settings.verbosity >= 0:
                render_plan(report.plan, title=f"Plan for {recipe}")
            render_problems(problems)
            if ok:
                ui.info(f"[green]ok[/]: {recipe} is valid")
        if not ok:
            raise typer.Exit(1)
