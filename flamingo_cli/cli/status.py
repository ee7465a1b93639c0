"""`flamingo status RUN_DIR|RECIPE`: a run's state, progress, metrics, checkpoints and loss
curves, read from its run directory (also one copied from a cluster, or still being written)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flamingo_cli.cli.common import JsonOption, command, user_errors

if TYPE_CHECKING:
    from flamingo_cli.monitor.status import RunStatus, StatusReader


def register(app: typer.Typer) -> None:
    command(app, "status")(status)


_TargetArg = Annotated[
    Path,
    typer.Argument(
        help="A run directory (run.output_dir/run.name, e.g. runs/NAME) or the recipe of the run.",
        metavar="RUN_DIR|RECIPE",
    ),
]
_FollowOption = Annotated[
    bool, typer.Option("--follow", "-f", help="Refresh until the run is no longer running.")
]
_IntervalOption = Annotated[
    float,
    typer.Option("--interval", min=0.1, metavar="SECONDS", help="Seconds between refreshes."),
]


def status(
    target: _TargetArg,
    json_: JsonOption = False,
    follow: _FollowOption = False,
    interval: _IntervalOption = 2.0,
) -> None:
    """Show a run: running, finished or stopped at step N; progress and ETA; the last metrics
    per dataset; every complete checkpoint; held-out losses; loss curves per dataset.

    Exit 0 for any run (stopped ones too), 1 when the path holds no run.
    """
    from flamingo_cli.monitor.status import StatusReader, run_dir_for

    with user_errors(json_):
        run_dir, recipe, path = run_dir_for(target)
        reader = StatusReader(run_dir, recipe, path)
        current = reader.read(time.time())
        if not follow:
            _show(current, json_)
            return
        try:
            _follow(reader, current, json_, interval)
        except KeyboardInterrupt:
            raise typer.Exit(0) from None


def _show(current: RunStatus, json_: bool) -> None:
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.status_view import render_status

    if json_:
        ui.print_json(current.to_dict())
    else:
        render_status(current, ui.console)


def _follow(reader: StatusReader, current: RunStatus, json_: bool, interval: float) -> None:
    """Refresh until the run stops running: in place on a terminal, else a new status (one JSON
    line with --json) each time the step or state changes."""
    from flamingo_cli.ui import console as ui

    if not json_ and ui.console.is_terminal:
        from flamingo_cli.ui.status_view import follow_live

        follow_live(lambda: reader.read(time.time()), current, interval)
        return
    shown: tuple[object, ...] | None = None
    while True:
        seen = (current.state, current.step, len(current.checkpoints))
        if seen != shown:
            _show_line(current) if json_ else _show(current, json_)
            shown = seen
        if current.state != "running":
            return
        time.sleep(interval)
        current = reader.read(time.time())


def _show_line(current: RunStatus) -> None:
    import json
    import sys

    sys.stdout.write(json.dumps(current.to_dict(), default=str) + "\n")
    sys.stdout.flush()
