"""`inspect-shards` output: per-shard tables with totals, deep histograms, findings, progress."""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.markup import escape
from rich.table import Table

from flamingo_cli.inspect.report import DeepStats, GroupReport, InspectReport, ShardReport
from flamingo_cli.ui.console import console, err_console, format_bytes, info, settings

CLEAN_ROWS = 20  # clean shards listed per group unless --verbose


@contextmanager
def shard_progress(total: int) -> Iterator[Callable[[ShardReport], None]]:
    """A progress bar on stderr while shards are scanned; a no-op when quiet or not a tty."""
    if settings.verbosity < 0 or total < 2:
        yield lambda _report: None
        return
    # imported here: --json and --quiet runs skip it, and every start-up millisecond shows
    # against `tar -tf` on small shard sets
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("scanning shards"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    # No refresh thread: the scan forks worker processes, and forking beside threads is unsafe.
    with Progress(*columns, console=err_console, transient=True, auto_refresh=False) as progress:
        task = progress.add_task("scan", total=total)

        def advance(_report: ShardReport) -> None:
            progress.advance(task)
            progress.refresh()

        yield advance


def _extensions(counts: dict[str, int]) -> str:
    return " ".join(f"{ext or '(none)'}:{n:,}" for ext, n in sorted(counts.items()))


def _problems(errors: int, warnings: int) -> str:
    if not errors and not warnings:
        return "[green]clean[/]"
    parts = []
    if errors:
        parts.append(f"[red]{errors} error(s)[/]")
    if warnings:
        parts.append(f"[yellow]{warnings} warning(s)[/]")
    return ", ".join(parts)


def _shard_table(group: GroupReport) -> Table:
    kind = group.kind or "unknown kind"
    table = Table(title=f"{escape(group.name)} ({kind})", title_justify="left", show_footer=True)
    shards = group.shards
    table.add_column("shard", footer=f"{len(shards)} shard(s)")
    table.add_column("samples", justify="right", footer=f"{group.total('samples'):,}")
    table.add_column("members", justify="right", footer=f"{group.total('members'):,}")
    table.add_column("size", justify="right", footer=format_bytes(group.total("bytes")))
    table.add_column("extensions", footer=escape(_extensions(group.extensions)), overflow="fold")
    table.add_column("sizes.json", justify="right")
    table.add_column("problems", footer=_problems(group.total("errors"), group.total("warnings")))
    shown_clean = 0
    hidden = 0
    for shard in shards:
        clean = not shard.errors and not shard.warnings
        if clean and settings.verbosity < 1 and shown_clean >= CLEAN_ROWS:
            hidden += 1
            continue
        shown_clean += clean
        table.add_row(
            escape(posixpath.basename(shard.url) or shard.url),
            f"{shard.samples:,}",
            f"{shard.members:,}",
            format_bytes(shard.bytes),
            escape(_extensions(shard.extensions)),
            "-" if shard.sizes_json is None else f"{shard.sizes_json:,}",
            _problems(shard.errors, shard.warnings),
        )
    if hidden:
        table.add_row(f"[dim]... {hidden} more clean shard(s) (-v lists them)[/]", *[""] * 6)
    return table


def _histogram(title: str, counts: Counter[int] | dict[str, int], total: int) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None)
    table.add_column(justify="right")
    table.add_column(justify="right")
    table.add_column()
    items = sorted(counts.items()) if isinstance(counts, Counter) else list(counts.items())
    for label, n in items:
        bar = "#" * round(30 * n / total) if total else ""
        table.add_row(str(label), f"{n:,}", f"[cyan]{bar}[/]")
    return table


def _deep(group: GroupReport, deep: DeepStats) -> None:
    console.print(
        f"[bold]{escape(group.name)}[/]: decoded {deep.samples:,} sample(s), "
        f"{deep.failed:,} with errors"
    )
    if deep.images_per_sample:
        console.print(_histogram("images per document", deep.images_per_sample, deep.samples))
        console.print(
            _histogram(
                "images per document after OpenFlamingo's filters",
                deep.kept_per_sample,
                deep.samples,
            )
        )
        if deep.dropped:
            dropped = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(deep.dropped.items()))
            console.print(f"dropped images: {escape(dropped)}")
        console.print(f"documents under min_num_images: {deep.under_min_images:,}")
    if deep.tokens:
        console.print(_histogram("tokens per sample", deep.token_buckets(), deep.samples))
        console.print(
            f"tokens p50 {deep.token_percentile(0.5)}, p95 {deep.token_percentile(0.95)}, "
            f"max {max(deep.tokens)}; {deep.over_max_tokens:,} sample(s) truncated"
        )


def render_report(report: InspectReport) -> None:
    """Shard tables with totals, deep statistics, every listed finding, a summary line."""
    if settings.verbosity >= 0:
        for group in report.groups:
            console.print(_shard_table(group))
            deep = group.deep
            if deep is not None:
                _deep(group, deep)
    findings = report.findings()
    if findings:
        table = Table(title="findings", title_justify="left")
        for column in ("shard", "key", "check", "reason"):
            table.add_column(column, overflow="fold")
        for f in findings:
            style = "red" if f.severity == "error" else "yellow"
            table.add_row(
                escape(f.shard),
                escape(f.key or "-"),
                f"[{style}]{f.check}[/]",
                escape(f.reason),
            )
        console.print(table)
        left = report.errors + report.warnings - len(findings)
        if left > 0:
            console.print(f"{left:,} more finding(s) not listed (raise --max-errors)")
    for path in report.sizes_written:
        info(f"wrote {escape(path)}")
    if report.preview:
        info(f"wrote preview {escape(report.preview)}")
    shards = report.unique_shards()
    samples = sum(s.samples for s in shards)
    if report.ok:
        info(
            f"[green]ok[/]: {len(shards)} shard(s), {samples:,} sample(s), no errors"
            + (f", {report.warnings} warning(s)" if report.warnings else "")
        )
    else:
        info(
            f"[bold red]problems[/]: {report.errors} error(s), {report.warnings} warning(s) in "
            f"{len(shards)} shard(s)"
        )
