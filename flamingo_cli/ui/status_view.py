"""`flamingo status` output: the run's state and progress, the last metrics per dataset, its
checkpoints, held-out losses over time, and a loss chart per dataset (training loss as a braille
line, held-out losses as dots) sized to the terminal."""

from __future__ import annotations

import datetime
import itertools
import math
import time
from collections.abc import Callable

from rich import box
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from flamingo_cli.monitor.live import ago, clock
from flamingo_cli.monitor.status import Curve, RunStatus
from flamingo_cli.ui.live_view import footer_items
from flamingo_cli.units import format_bytes

# braille dot bits by (column, row) within a 2 x 4 cell
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
HELD_OUT_MARK = "●"
HELD_OUT_ROWS = 12  # held-out steps listed (the newest); the chart shows them all
_STATE_STYLE = {"running": "bold green", "finished": "bold", "stopped": "bold yellow"}


def shown(text: object) -> str:
    """`text` as a terminal can print it: a lone surrogate (a non-UTF-8 file name, a `\\udcff`
    in a metrics key) written as its escape, as error messages write it."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _scale(value: float, low: float, high: float, cells: int) -> int:
    """`value` in [low, high] onto 0..cells-1 (the middle when the range is empty)."""
    if high <= low:
        return cells // 2
    return min(cells - 1, max(0, round((value - low) / (high - low) * (cells - 1))))


def _line_dots(
    curve: Curve, x: tuple[float, float], y: tuple[float, float], w: int, h: int
) -> set[tuple[int, int]]:
    """Dots (column, row from the top) of `curve` joined point to point, on a w x h dot grid."""
    dots: set[tuple[int, int]] = set()
    points = [(_scale(s, *x, w), h - 1 - _scale(v, *y, h)) for s, v in curve]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            dots.add((round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps)))
    dots.update(points)
    return dots


def chart_lines(train: Curve, evals: Curve, width: int, height: int) -> list[str]:
    """A chart of `width` x `height` characters with its axis labels: loss on the left (top and
    bottom values), steps below (first and last)."""
    label = 8
    cols = max(width - label, 4)
    curves = [c for c in (train, evals) if c]
    if not curves:
        return []
    steps = [s for c in curves for s, _ in c]
    values = [v for c in curves for _, v in c if math.isfinite(v)]
    if not values:
        return []
    x = (float(min(steps)), float(max(steps)))
    y = (min(values), max(values))
    finite = [(s, v) for s, v in train if math.isfinite(v)]
    grid = [[0] * cols for _ in range(height)]
    for dx, dy in _line_dots(finite, x, y, cols * 2, height * 4):
        grid[dy // 4][dx // 2] |= _DOTS[dx % 2][dy % 4]
    cells = [[chr(0x2800 + bits) if bits else " " for bits in row] for row in grid]
    for s, v in evals:
        if math.isfinite(v):
            cells[height - 1 - _scale(v, *y, height)][_scale(s, *x, cols)] = HELD_OUT_MARK
    lines = []
    for index, row in enumerate(cells):
        tick = f"{y[1]:.3f}" if index == 0 else f"{y[0]:.3f}" if index == height - 1 else ""
        lines.append(f"{tick:>{label - 1}} " + "".join(row))
    first, last = f"{int(x[0])}", f"step {int(x[1])}"
    lines.append(" " * label + first + last.rjust(cols - len(first)))
    return lines


def _chart(name: str, train: Curve, evals: Curve, width: int, height: int) -> RenderableType:
    title = Text(f"{name} loss", style="bold")
    title.append("  training ⠉⠒", style="dim")
    if evals:
        title.append(f"  held-out {HELD_OUT_MARK}", style="dim")
    body = Text()
    for index, line in enumerate(chart_lines(train, evals, width, height)):
        if index:
            body.append("\n")
        for char in line:
            body.append(char, style="magenta" if char == HELD_OUT_MARK else None)
    return Group(title, body)


def _headline(status: RunStatus) -> Group:
    line = Text.assemble(
        (shown(status.run_dir), "bold"), "\n", (shown(status.detail), _STATE_STYLE[status.state])
    )
    total = status.total_steps
    parts = [f"step {status.step if status.step is not None else '-'}/{total or '?'}"]
    if total and status.step is not None:
        parts[0] += f" ({100 * min(status.step / total, 1):.0f}%)"
    if status.watch.epoch is not None:
        parts.append(f"epoch {status.watch.epoch}")
    if status.eta_s is not None:
        parts.append(f"eta {clock(status.eta_s)} (at the logged samples/s)")
    return Group(line, Text("  ".join(parts)))


def _datasets(status: RunStatus) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("dataset", "loss", "smoothed", "held-out", "samples/s", "tok/s", "dropped"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for d in status.watch.datasets.values():
        table.add_row(
            escape(shown(d.name)),
            *(f"{v:.4f}" if v is not None else "-" for v in (d.last, d.smoothed, d.held_out)),
            f"{d.samples_per_s:,.1f}" if d.samples_per_s is not None else "",
            f"{d.tokens_per_s:,.0f}" if d.tokens_per_s is not None else "",
            f"{d.dropped:,}",
        )
    return table


def _checkpoints(status: RunStatus) -> RenderableType:
    if not status.checkpoints:
        return Text("no complete checkpoint", style="dim")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title_justify="left")
    for column in ("checkpoint", "size", "saved (UTC)", ""):
        table.add_column(column, justify="right" if column == "size" else "left")
    for c in status.checkpoints:
        saved = datetime.datetime.fromtimestamp(c.saved_at, datetime.UTC)
        table.add_row(
            f"step {c.step}",
            format_bytes(c.size),
            saved.strftime("%Y-%m-%d %H:%M:%S"),
            ago(status.now - c.saved_at),
        )
    return table


def _held_out(status: RunStatus) -> RenderableType | None:
    names = list(status.held_out_curves)
    if not names:
        return None
    by_step: dict[int, dict[str, float]] = {}
    for name, curve in status.held_out_curves.items():
        for step, loss in curve:
            by_step.setdefault(step, {})[name] = loss
    steps = sorted(by_step)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("held-out at")
    for name in names:
        table.add_column(escape(shown(name)), justify="right")
    for step in steps[-HELD_OUT_ROWS:]:
        row = by_step[step]
        table.add_row(f"step {step}", *(f"{row[n]:.4f}" if n in row else "" for n in names))
    if len(steps) > HELD_OUT_ROWS:
        table.caption = f"and {len(steps) - HELD_OUT_ROWS} earlier evaluations (--json has all)"
    return table


def _notes(status: RunStatus) -> list[RenderableType]:
    notes: list[RenderableType] = []
    if status.bad_lines:
        notes.append(
            Text(
                f"note: {status.bad_lines} line(s) of metrics.jsonl are not metrics rows "
                "(a run killed mid-write); skipped",
                style="dim",
            )
        )
    if status.partial_line:
        notes.append(
            Text(
                "note: the last line of metrics.jsonl is still being written; not shown yet",
                style="dim",
            )
        )
    return notes


def status_view(status: RunStatus, width: int, height: int | None = None) -> Group:
    """Everything `flamingo status` prints, at `width` columns; the charts share the rows a
    terminal `height` high leaves them (8 rows each without one, 4 to 14 with one)."""
    names = list(dict.fromkeys([*status.train_curves, *status.held_out_curves]))
    parts: list[RenderableType] = [_headline(status)]
    if status.watch.datasets:
        parts += [Text(), _datasets(status)]
        footer = [i for i in footer_items(status.watch, status.now) if "held-out" not in i]
        footer = [i for i in footer if not i.startswith("checkpoint")]
        if footer:
            parts.append(Text("  ".join(footer), style="dim"))
    parts += [Text(), _checkpoints(status)]
    held = _held_out(status)
    if held is not None:
        parts += [Text(), held]
    notes = _notes(status)
    if notes:
        notes = [Text(), *notes]
    rows = 8
    if height is not None and names:
        left = height - _lines(Group(*parts, *notes), width) - 1
        rows = max(4, min(14, left // len(names) - 3))  # a chart: blank, title, rows, steps
    for name in names:
        train, evals = status.train_curves.get(name, []), status.held_out_curves.get(name, [])
        parts += [Text(), _chart(shown(name), train, evals, width, rows)]
    return Group(*parts, *notes)


def _lines(renderable: RenderableType, width: int) -> int:
    """How many lines `renderable` takes at `width` columns."""
    from io import StringIO

    measure = Console(width=width, file=StringIO(), color_system=None)
    return len(measure.render_lines(renderable, measure.options, pad=False))


def render_status(status: RunStatus, console: Console) -> None:
    """Print the status at the console's size."""
    height = console.height if console.is_terminal else None
    console.print(status_view(status, console.width, height))


def follow_live(read: Callable[[], RunStatus], first: RunStatus, interval: float) -> None:
    """Redraw the status in place every `interval` seconds until the run is not running."""
    from rich.live import Live

    from flamingo_cli.ui.console import console

    current = first
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            live.update(status_view(current, console.width, console.height), refresh=True)
            if current.state != "running":
                return
            time.sleep(interval)
            current = read()


def status_text(status: RunStatus, width: int, height: int | None = None) -> str:
    """The status as plain text (for tests)."""
    from io import StringIO

    console = Console(width=width, record=True, color_system=None, file=StringIO())
    console.print(status_view(status, width, height))
    return console.export_text()
