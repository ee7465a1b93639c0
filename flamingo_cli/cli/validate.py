"""`flamingo validate-config`: check a recipe and print the resolved plan, no torch needed."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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

if TYPE_CHECKING:
    from flamingo_cli.errors import Problem
    from flamingo_cli.recipe.load import Override
    from flamingo_cli.recipe.validate import ValidationReport


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
    from flamingo_cli.errors import UsageError

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
                recipe, import_problems = _import(from_openflamingo, out, json_, stack)
            assert recipe is not None
            report = _validate(recipe, overrides, check_shards, json_, import_problems)
        _show(recipe, report, import_problems, json_)


def _import(
    command: str, out: Path | None, json_: bool, stack: contextlib.ExitStack
) -> tuple[Path, list[Problem]]:
    """Write the recipe of an OpenFlamingo command to `out` (without --out: printed, and
    written to a temporary file that `stack` removes); return its path and the problems."""
    from flamingo_cli.recipe.openflamingo import recipe_from_openflamingo
    from flamingo_cli.ui import console as ui

    imported = recipe_from_openflamingo(command)
    if out is None:
        if not json_:
            ui.console.out(imported.toml, highlight=False)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flamingo-")))
        out = tmp / "openflamingo-import.toml"
    out.write_text(imported.toml, encoding="utf-8")
    return out, imported.problems


def _validate(
    recipe: Path,
    overrides: list[Override],
    check_shards: bool,
    json_: bool,
    import_problems: list[Problem],
) -> ValidationReport:
    """Validate the recipe; a recipe that does not load is printed as JSON with --json."""
    from flamingo_cli.errors import ProblemsFound
    from flamingo_cli.recipe.validate import validate_recipe
    from flamingo_cli.ui import console as ui

    try:
        return validate_recipe(recipe, overrides, check_shards=check_shards)
    except ProblemsFound as found:
        if not json_:
            raise
        problems = [*import_problems, *found.problems]
        ui.print_json(
            {"recipe": str(recipe), "ok": False, "problems": [p.to_dict() for p in problems]}
        )
        raise typer.Exit(1) from None


def _show(
    recipe: Path, report: ValidationReport, import_problems: list[Problem], json_: bool
) -> None:
    """Print the plan and every problem (or the JSON report); exit 1 on an error."""
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.errors import render_problems
    from flamingo_cli.ui.plan import render_plan

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
