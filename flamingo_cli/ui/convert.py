"""Progress bar and summary table of `flamingo convert`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from flamingo_cli.ui.console import console, err_console, format_bytes, info, settings
from flamingo_cli.ui.errors import render_problems

if TYPE_CHECKING:
    from flamingo_cli.convert.runner import ConvertReport, MergeReport, ProgressState


class _Rates(ProgressColumn):
    """Samples per second and image MB per second since the start."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        samples = task.fields.get("samples", 0)
        mb = task.fields.get("image_bytes", 0) / 1e6
        if elapsed <= 0:
            return Text("")
        return Text(
            f"{samples / elapsed:,.0f} {self.unit}/s  {mb / elapsed:,.1f} MB/s", style="cyan"
        )


@contextmanager
def convert_progress(
    label: str, unit: str, *, enabled: bool = True
) -> Iterator[Callable[[ProgressState], None] | None]:
    """A progress bar on stderr, shown from the first update (hidden under --quiet and --json).

    Yields the callback the library calls, or None when nothing is shown.
    """
    if not enabled or settings.verbosity < 0:
        yield None
        return
    progress = Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        TextColumn("{task.fields[tasks]}"),
        _Rates(unit),
        TimeRemainingColumn(),
        console=err_console,
    )
    task_id = progress.add_task(label, total=None, tasks="", samples=0, image_bytes=0)

    def update(state: ProgressState) -> None:
        if not progress.live.is_started:
            progress.start()
        progress.update(
            task_id,
            total=state.work_total or None,
            completed=state.work_done,
            tasks=f"{state.tasks_done}/{state.tasks_total} inputs",
            samples=state.samples,
            image_bytes=state.image_bytes,
        )

    try:
        yield update
    finally:
        if progress.live.is_started:
            progress.stop()


_LABELS = {
    "docs_in": "documents read",
    "docs_out": "documents written",
    "samples_in": "samples read",
    "samples_out": "samples written",
    "bad_lines": "bad JSON lines (skipped)",
    "dropped_url_duplicate": "dropped: URL duplicate",
    "dropped_min_images": "dropped: too few images",
    "dropped_no_image": "dropped: no image",
    "dropped_no_caption": "dropped: no caption",
    "images_found": "images found",
    "images_missing": "images missing",
    "images_corrupt": "images corrupt",
    "images_too_large": "images too large (over --max-image-pixels)",
    "bad_caption": "captions not UTF-8 (skipped)",
    "bad_names": "names not UTF-8 or too long (skipped)",
    "count_mismatch": "shards whose count differs from _stats.json",
    "stats_missing": "shards without _stats.json",
    "inputs": "inputs",
    "inputs_reused": "inputs already complete (skipped)",
    "inputs_missing": "inputs missing",
    "inputs_failed": "inputs failed",
    "shards": "shards written",
}


def render_convert_report(report: ConvertReport) -> None:
    """Problems on stderr, then one table of totals and the rates."""
    problems = report.problems
    if problems and settings.verbosity >= 0:
        render_problems(problems)
        hidden = sum(r.problems_total for r in report.records) - len(problems)
        if hidden > 0:
            err_console.print(f"... and {hidden} more (see manifest.d/ for the counts)")
    totals = report.totals
    node = report.partition
    where = f" (node {node.rank} of {node.count}, from {node.source})" if node.split else ""
    table = Table(
        title=f"convert {report.kind} -> {escape(report.out_dir)}{where}", title_justify="left"
    )
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    for key, label in _LABELS.items():
        if key in totals and (totals[key] or key in ("inputs", "shards")):
            table.add_row(label, f"{totals[key]:,}")
    elapsed = max(report.elapsed_s, 1e-9)
    image_mb = totals["image_bytes"] / 1e6
    table.add_row("image data read", f"{image_mb:,.1f} MB")
    table.add_row("shard data written", f"{totals['shard_bytes'] / 1e6:,.1f} MB")
    table.add_row("time", f"{report.elapsed_s:,.1f} s")
    table.add_row("image MB/s", f"{image_mb / elapsed:,.1f}")
    console.print(table)
    if not report.manifest_written:
        info(
            "manifest.json and sizes.json are written by "
            f"`flamingo convert merge {escape(report.out_dir)}` once every node has finished"
        )


def render_merge_report(report: MergeReport) -> None:
    """Missing inputs as warnings, incomplete ones as errors (by name), then the totals."""
    if report.missing and settings.verbosity >= 0:
        for record in report.missing:
            err_console.print(f"[yellow]warning[/]: {escape(record.input)}: input not found")
    for item in report.incomplete:
        err_console.print(f"[bold red]incomplete[/]: {escape(item.input)}: {escape(item.reason)}")
    table = Table(title=f"merge {report.kind} <- {escape(report.out_dir)}", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    table.add_row("inputs planned", f"{report.planned:,}")
    table.add_row("inputs complete", f"{report.complete:,}")
    table.add_row("inputs not found (warnings)", f"{len(report.missing):,}")
    table.add_row("inputs incomplete", f"{len(report.incomplete):,}")
    for key in ("shards", "samples"):
        table.add_row(key, f"{report.totals[key]:,}")
    table.add_row("shard data", format_bytes(report.totals["shard_bytes"]))
    console.print(table)
    if report.written:
        info(f"wrote {escape(report.out_dir)}/manifest.json and sizes.json")
    else:
        err_console.print(
            f"[bold red]error[/]: {len(report.incomplete)} of {report.planned} input(s) are not "
            "done; manifest.json not written (rerun the nodes that own them, or pass "
            "--allow-incomplete)"
        )
