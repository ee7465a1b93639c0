"""The `flamingo` command: global options and the subcommands mounted on one Typer app."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from flamingo_cli import __version__
from flamingo_cli.cli import (
    convert,
    eval_fewshot,
    eval_loss,
    generate,
    inspect,
    quickstart,
    status,
    train,
    validate,
)


class _Commands(TyperGroup):
    """The subcommands; a command line they cannot parse still gets its `{"error", "fix"}`
    on stdout when it asks for `--json`, as every other error does (cli/common.py)."""

    def invoke(self, ctx: Any) -> Any:
        wants_json = "--json" in ctx.args
        try:
            return super().invoke(ctx)
        except Exception as error:
            if wants_json and _is_usage_error(error):
                _usage_json(error)
            raise


def _is_usage_error(error: Exception) -> bool:
    """click's UsageError, from whichever copy of click Typer parses with: exit code 2."""
    return getattr(error, "exit_code", None) == 2 and hasattr(error, "format_message")


def _usage_json(error: Any) -> None:
    from flamingo_cli.errors import UsageError
    from flamingo_cli.ui.console import print_json
    from flamingo_cli.ui.errors import error_json

    context = getattr(error, "ctx", None)
    where = context.command_path if context is not None else "flamingo"
    message = str(error.format_message())
    print_json(error_json(UsageError(message, fix=f"see `{where} --help`")))


app = typer.Typer(
    cls=_Commands,
    name="flamingo",
    help="From raw MMC4 and LAION downloads to a trained OpenFlamingo-style model.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flamingo {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More detail (repeatable).")
    ] = 0,
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="FLAMINGO_DEBUG", help="Show tracebacks for user errors."),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Convert, inspect, validate, train and evaluate OpenFlamingo-style models."""
    from flamingo_cli.ui.console import configure

    configure(quiet=quiet, verbose=verbose, debug=debug)


validate.register(app)
convert.register(app)
inspect.register(app)
train.register(app)
eval_loss.register(app)
eval_fewshot.register(app)
quickstart.register(app)
status.register(app)
generate.register(app)


def main() -> None:
    app()
