"""What every subcommand shares: option types and turning user errors into exit codes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar

import typer

from flamingo_cli.errors import FlamingoError

T = TypeVar("T")

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a recipe value, e.g. --set optim.lr=3e-4 (repeatable).",
    ),
]


@contextmanager
def user_errors() -> Iterator[None]:
    """Render FlamingoError without a traceback and exit with its code (1 data, 2 usage)."""
    from flamingo_cli.ui.errors import render_error

    try:
        yield
    except FlamingoError as error:
        render_error(error)
        raise typer.Exit(error.exit_code) from None


def call(fn: Callable[[], T]) -> T:
    """Run `fn` under `user_errors`."""
    with user_errors():
        return fn()
    raise AssertionError("unreachable")  # pragma: no cover
