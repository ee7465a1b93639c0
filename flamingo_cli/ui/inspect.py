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


# Columns of the shard table by how much they are missed when the terminal is narrow: the
# last ones go first. The shard name is never cut or wrapped.
_DROP_ORDER = ("shard", "samples", "problems", "size", "extensions", "sizes.json", "members")
_RIGHT = {"samples", "members", "size", "sizes.json"}


def _shard_rows(group: GroupReport) -> tuple[list[dict[str, str]], int]:
    """The table's cells by column name, and how many clean shards were left out."""
    rows: list[dict[str, str]] = []
    shown_clean = hidden = 0
    for shard in group.shards:
        clean = not shard.errors and not shard.warnings
        if clean and settings.verbosity < 1 and shown_clean >= CLEAN_ROWS:
            hidden += 1
            continue
        shown_clean += clean
        rows.append(
            {
                "shard": escape(posixpath.basename(shard.url) or shard.url),
                "samples": f"{shard.samples:,}",
                "members": f"{shard.members:,}",
                "size": format_bytes(shard.bytes),
                "extensions": escape(_extensions(shard.extensions)),
                "sizes.json": "-" if shard.sizes_json is None else f"{shard.sizes_json:,}",
                "problems": _problems(shard.errors, shard.warnings),
            }
        )
    return rows, hidden


def _fitting(cells: list[dict[str, str]], width: int) -> list[str]:
    """The columns that fit in `width` cells, in table order; extensions fold to their header."""
    from rich.text import Text

    def need(name: str) -> int:
        widest = max(Text.from_markup(row[name]).cell_len for row in cells)
        return 3 + max(len(name), min(widest, len(name)) if name == "extensions" else widest)

    shown = list(_DROP_ORDER)
    while len(shown) > 2 and 1 + sum(need(n) for n in shown) > width:
        shown.pop()
    order = ("shard", "samples", "members", "size", "extensions", "sizes.json", "problems")
    return [n for n in order if n in shown]


def _shard_table(group: GroupReport, width: int) -> Table:
    kind: str = group.kind or "unknown kind"
    if group.share is not None and group.dataset is not None:  # a source of a blend
        kind = f"{kind}, {group.share:.0%} of {escape(group.dataset)}'s samples"
    table = Table(title=f"{escape(group.name)} ({kind})", title_justify="left", show_footer=True)
    rows, hidden = _shard_rows(group)
    footer = {
        "shard": f"{len(group.shards)} shard(s)",
        "samples": f"{group.total('samples'):,}",
        "members": f"{group.total('members'):,}",
        "size": format_bytes(group.total("bytes")),
        "extensions": escape(_extensions(group.extensions)),
        "sizes.json": "",
        "problems": _problems(group.total("errors"), group.total("warnings")),
    }
    columns = _fitting([*rows, footer], width)
    for name in columns:
        table.add_column(
            name,
            footer=footer[name],
            justify="right" if name in _RIGHT else "left",
            no_wrap=name != "extensions",
            overflow="fold",
        )
    for row in rows:
        table.add_row(*(row[name] for name in columns))
    if hidden:
        table.caption = f"... {hidden} more clean shard(s) (-v lists them)"
        table.caption_justify = "left"
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
            console.print(_shard_table(group, console.width))
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
