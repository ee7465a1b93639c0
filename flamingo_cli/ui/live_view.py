"""The live layout of a training run on a terminal: a header (run, step, epoch, elapsed, ETA,
bar), a row per dataset (loss, smoothed loss, recent losses, rates, drops) and a footer (lr,
gradient norm, skipped steps, data wait, MFU and memory when logged, the last checkpoint and
held-out losses). It fits 80 columns and gives a wider terminal to the sparklines.

`LiveLayout` re-renders a `RunWatch` at the console's width each time rich draws it; `now` is
called then (tests pass a fixed one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from flamingo_cli.monitor.live import DatasetWatch, RunWatch, ago, clock, number

SPARKS = "▁▂▃▄▅▆▇█"
MIN_SPARK = 8
SPARK_HEADER = "recent"


def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values as block characters, low to high over their own range."""
    shown = list(values)[-width:] if width > 0 else []
    if not shown:
        return ""
    low, high = min(shown), max(shown)
    span = high - low
    top = len(SPARKS) - 1
    return "".join(SPARKS[round((v - low) / span * top) if span > 0 else 0] for v in shown)


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _rate(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def header(watch: RunWatch, now: float, width: int) -> Group:
    """Run name, step / total, epoch, elapsed and ETA over a bar of the steps done."""
    total = watch.total_steps
    parts = [f"step {watch.step}/{total if total else '?'}"]
    if watch.epoch is not None:
        parts.append(f"epoch {watch.epoch}")
    elapsed = watch.elapsed(now)
    if elapsed is not None:
        parts.append(f"elapsed {clock(elapsed)}")
    eta = watch.eta(now)
    parts.append(f"eta {clock(eta) if eta is not None else '?'}")
    line = Text()
    if watch.name:
        line.append(watch.name, style="bold")
        line.append("  ")
    line.append("  ".join(parts))
    fraction = watch.fraction()
    percent = Text(f" {100 * fraction:3.0f}%" if fraction is not None else "    ?")
    bar = Table.grid()
    bar.add_column(width=max(width - len(percent), 1))
    bar.add_column()
    completed = watch.step if total else 0
    bar.add_row(ProgressBar(total=float(total or 1), completed=completed), percent)
    return Group(line, bar)


def _columns() -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    table.add_column("dataset", no_wrap=True, max_width=16, overflow="ellipsis")
    table.add_column("loss", justify="right", no_wrap=True)
    table.add_column("smoothed", justify="right", no_wrap=True)
    table.add_column(SPARK_HEADER, no_wrap=True, style="cyan")
    table.add_column("samples/s", justify="right", no_wrap=True)
    table.add_column("tok/s", justify="right", no_wrap=True)
    table.add_column("dropped", justify="right", no_wrap=True)
    return table


def _rows(watch: RunWatch, spark: int) -> list[list[str]]:
    """A row per dataset; the run's rates go in the datasets' place while the metrics carry no
    per-dataset ones (one dataset), or in a row of their own (several)."""
    datasets: list[DatasetWatch] = [d for d in watch.datasets.values() if d.recent]
    own_rates = any(d.samples_per_s is not None for d in datasets)
    run_rates = [
        _rate(number(watch.last, "samples_per_s"), 1),
        _rate(number(watch.last, "tokens_per_s"), 0),
    ]
    rows = []
    for d in datasets:
        rates = [_rate(d.samples_per_s, 1), _rate(d.tokens_per_s, 0)]
        if not own_rates and len(datasets) == 1:
            rates = run_rates
        spark_text = sparkline(d.recent, spark).ljust(spark)
        row = [d.name, _loss(d.last), _loss(d.smoothed), spark_text, *rates]
        rows.append([*row, f"{d.dropped:,}"])
    if len(datasets) > 1:
        rows.append(["all", "", "", "", *run_rates, f"{sum(d.dropped for d in datasets):,}"])
    return rows


def dataset_table(watch: RunWatch, console: Console, options: ConsoleOptions) -> Table:
    """The datasets' table, its sparklines as wide as the width left over."""
    width = options.max_width
    probe = _columns()
    for row in _rows(watch, 1):
        probe.add_row(*row)
    used = Measurement.get(console, options, probe).maximum  # with the header's width
    spark = max(width - used + len(SPARK_HEADER), MIN_SPARK)
    table = _columns()
    rows = _rows(watch, spark)
    for index, row in enumerate(rows):
        total = len(rows) > 1 and index == len(rows) - 1 and len(rows) > len(watch.datasets)
        table.add_row(*row, style="dim" if total else None)
    return table


def _flow(items: Iterable[str], width: int) -> Text:
    """Items joined by two spaces, wrapped between items (never inside one) to `width`."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += "  " + item
        else:
            lines.append(item)
    return Text("\n".join(lines), style="dim")


def footer_items(watch: RunWatch, now: float) -> list[str]:
    """lr, gradient norm, skipped steps, data wait, MFU/TFLOPs/memory when logged, the last
    checkpoint and the last held-out losses."""
    last = watch.last
    items = []
    formats = [
        ("lr", "lr {:.2e}", 1.0),
        ("grad_norm", "gnorm {:.3f}", 1.0),
        ("skipped_steps", "skipped {:.0f}", 1.0),
        ("data_wait", "data wait {:.0f}%", 100.0),
        ("mfu", "mfu {:.1f}%", 100.0),
        ("tflops_per_gpu", "{:.1f} TFLOP/s per GPU", 1.0),
        ("memory/peak_gib", "peak memory {:.1f} GiB", 1.0),
    ]
    for key, text, scale in formats:
        value = number(last, key)
        if value is not None:
            items.append(text.format(value * scale))
    if watch.checkpoint_step is not None and watch.checkpoint_at is not None:
        items.append(f"checkpoint step {watch.checkpoint_step} ({ago(now - watch.checkpoint_at)})")
    evals = [(d.name, d.held_out) for d in watch.datasets.values() if d.held_out is not None]
    if evals and watch.held_out_step is not None:
        losses = "  ".join(f"{name} {loss:.4f}" for name, loss in evals)
        items.append(f"held-out at step {watch.held_out_step}: {losses}")
    return items


def live_layout(watch: RunWatch, now: float, console: Console, options: ConsoleOptions) -> Group:
    width = options.max_width
    return Group(
        header(watch, now, width),
        dataset_table(watch, console, options),
        _flow(footer_items(watch, now), width),
    )


class LiveLayout:
    """A renderable of `watch` drawn at the console's width, at the time `now()` gives."""

    def __init__(self, watch: RunWatch, now: Callable[[], float]) -> None:
        self.watch = watch
        self.now = now

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield live_layout(self.watch, self.now(), console, options)


def render_text(watch: RunWatch, now: float, width: int) -> str:
    """The layout as plain text at `width` columns (what the goldens hold)."""
    from io import StringIO

    console = Console(width=width, record=True, color_system=None, file=StringIO())
    console.print(LiveLayout(watch, lambda: now))
    return console.export_text()
