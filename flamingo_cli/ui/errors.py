"""Rendering of user errors and validation problems (no tracebacks unless debugging)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape

from flamingo_cli.errors import FlamingoError, Problem, ProblemsFound
from flamingo_cli.ui.console import err_console, settings

_STYLE = {"error": "bold red", "warning": "bold yellow"}


def render_problems(problems: Sequence[Problem]) -> None:
    """One block per problem: severity, `file:line: key`, message, and the fix."""
    for problem in problems:
        label = f"[{_STYLE[problem.severity]}]{problem.severity}[/]"
        where = f"[bold]{escape(problem.location)}[/]: " if problem.location else ""
        err_console.print(f"{label}: {where}{escape(problem.message)}")
        if problem.fix:
            err_console.print(f"  [green]fix[/]: {escape(problem.fix)}")
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    if problems:
        err_console.print(f"{errors} error(s), {warnings} warning(s)")


def render_error(error: FlamingoError) -> None:
    """A short message for a user error; the traceback only in debug mode."""
    if settings.debug:
        err_console.print_exception()
    if isinstance(error, ProblemsFound):
        render_problems(error.problems)
        return
    err_console.print(f"[bold red]error[/]: {escape(error.message)}")
    if error.fix:
        err_console.print(f"  [green]fix[/]: {escape(error.fix)}")


def error_json(error: FlamingoError) -> dict[str, object]:
    """A fatal error as data: what went wrong, the fix, and every problem when there are several."""
    data: dict[str, object] = {"ok": False, "error": error.message, "fix": error.fix}
    if isinstance(error, ProblemsFound):
        data["problems"] = [p.to_dict() for p in error.problems]
    return data
