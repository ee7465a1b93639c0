"""`inspect-shards` as a library call: expand specs or a recipe, scan in parallel, compare
with sizes.json, optionally rewrite it. Returns an InspectReport; never prints."""

from __future__ import annotations

import multiprocessing
import os
import posixpath
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from flamingo_cli.errors import OpenerError, UsageError
from flamingo_cli.inspect.document import Filters
from flamingo_cli.inspect.report import Finding, GroupReport, InspectReport, ShardReport
from flamingo_cli.inspect.scan import ScanSettings, scan_shard
from flamingo_cli.shards.sizes import read_sizes
from flamingo_cli.shards.spec import expand_spec, local_path, url_kind
from flamingo_cli.shards.write import write_sizes

Progress = Callable[[ShardReport], None]


@dataclass(frozen=True)
class InspectOptions:
    """Command-line choices that apply to every shard."""

    deep: bool = False
    write_sizes: bool = False
    sim_threshold: float | None = None
    tokenizer: str | None = None
    max_errors: int = 1000
    allow_pipe: bool = False
    workers: int | None = None


@dataclass(frozen=True)
class ShardGroup:
    """Shards to inspect with the same settings, under one name in the report."""

    name: str
    urls: list[str]
    settings: ScanSettings


def _base_settings(options: InspectOptions) -> ScanSettings:
    filters = Filters()
    if options.sim_threshold is not None:
        filters = replace(filters, threshold=options.sim_threshold)
    return ScanSettings(
        deep=options.deep,
        filters=filters,
        tokenizer=options.tokenizer,
        max_errors=options.max_errors,
        allow_pipe=options.allow_pipe,
    )


def groups_from_specs(specs: Sequence[str], options: InspectOptions) -> list[ShardGroup]:
    """One group per SPEC argument: brace patterns, `::`, globs and directories expanded."""
    settings = _base_settings(options)
    groups = []
    for spec in specs:
        urls = expand_spec(spec, globs=True)
        if not urls:
            raise UsageError(f"{spec!r} names no shards", fix="check the pattern or directory")
        groups.append(ShardGroup(spec, urls, settings))
    return groups


def groups_from_recipe(path: str | Path, options: InspectOptions) -> list[ShardGroup]:
    """The training and eval shards of each dataset of a recipe, with its filters."""
    from flamingo_cli.recipe.load import load_recipe
    from flamingo_cli.recipe.schema import Mmc4Config

    recipe = load_recipe(path).recipe
    base = replace(_base_settings(options), allow_pipe=options.allow_pipe or recipe.data.allow_pipe)
    groups = []
    for name, config in recipe.datasets().items():
        settings = replace(
            base,
            max_tokens=config.max_tokens,
            expected_kind="interleaved" if isinstance(config, Mmc4Config) else "pairs",
            dataset=f"data.{name}",
        )
        if isinstance(config, Mmc4Config):
            threshold = options.sim_threshold
            settings = replace(
                settings,
                filters=Filters(
                    threshold=config.textsim_threshold if threshold is None else threshold,
                    assignment=config.assignment,
                    max_num_images=config.max_num_images,
                    min_num_images=config.min_num_images,
                ),
            )
        groups.append(ShardGroup(f"{name} training", expand_spec(config.shards), settings))
        if config.eval_shards:
            groups.append(ShardGroup(f"{name} eval", expand_spec(config.eval_shards), settings))
    if not groups:
        raise UsageError(f"recipe {path} has no [data.laion] or [data.mmc4] section")
    return groups


def inspect_shards(
    groups: Sequence[ShardGroup],
    options: InspectOptions,
    progress: Progress | None = None,
) -> InspectReport:
    """Scan every shard once (in parallel), check sizes.json, and write it when asked."""
    tasks = list(dict.fromkeys((url, g.settings) for g in groups for url in g.urls))
    reports = _scan_all(tasks, options.workers, progress)
    report = InspectReport(
        [
            GroupReport(
                g.name, [reports[(u, g.settings)] for u in g.urls], g.settings.expected_kind
            )
            for g in groups
        ],
        max_errors=options.max_errors,
    )
    shards = report.unique_shards()
    _check_sizes(shards, options)
    if options.write_sizes:
        report.sizes_written = _write_sizes(shards)
    return report


def _scan_all(
    tasks: list[tuple[str, ScanSettings]], workers: int | None, progress: Progress | None
) -> dict[tuple[str, ScanSettings], ShardReport]:
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    results: dict[tuple[str, ScanSettings], ShardReport] = {}
    if workers <= 1:
        for task in tasks:
            results[task] = scan_shard(*task)
            if progress:
                progress(results[task])
        return results
    import numpy  # noqa: F401  (the header checksums need it: import once, before forking)

    # Largest local files first, so one big shard does not finish alone at the end.
    ordered = sorted(tasks, key=lambda t: -_local_size(t[0]))
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures: dict[Future[ShardReport], tuple[str, ScanSettings]] = {
            pool.submit(scan_shard, *task): task for task in ordered
        }
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if progress:
                progress(results[futures[future]])
    return results


def _local_size(url: str) -> int:
    if url_kind(url) != "local":
        return 0
    try:
        return local_path(url).stat().st_size
    except OSError:
        return 0


def _check_sizes(shards: list[ShardReport], options: InspectOptions) -> None:
    """Compare each shard's count with the sizes.json beside it."""
    by_dir: dict[str, dict[str, int] | None] = {}
    for shard in shards:
        directory, name = posixpath.split(shard.url)
        if url_kind(shard.url) == "pipe":
            continue
        if directory not in by_dir:
            try:
                by_dir[directory] = read_sizes(directory, allow_pipe=options.allow_pipe)
            except OpenerError as exc:
                by_dir[directory] = None
                shard.add(Finding(shard.url, "sizes-json", exc.message))
        sizes = by_dir[directory]
        if sizes is None:
            continue
        if name not in sizes:
            shard.add(
                Finding(
                    shard.url,
                    "sizes-json",
                    "not listed in sizes.json" + (" (added)" if options.write_sizes else ""),
                    severity="warning",
                )
            )
            continue
        shard.sizes_json = sizes[name]
        if shard.readable and sizes[name] != shard.samples:
            fixed = options.write_sizes
            shard.add(
                Finding(
                    shard.url,
                    "sizes-json",
                    f"sizes.json says {sizes[name]} samples, the tar holds {shard.samples}"
                    + (" (rewritten)" if fixed else ""),
                    severity="warning" if fixed else "error",
                )
            )


def _write_sizes(shards: list[ShardReport]) -> list[str]:
    """Update sizes.json in each local directory with the counts of fully readable shards."""
    by_dir: dict[str, dict[str, int]] = {}
    for shard in shards:
        if url_kind(shard.url) != "local":
            shard.add(
                Finding(
                    shard.url,
                    "sizes-json",
                    "--write-sizes writes sizes.json beside local shards only",
                    severity="warning",
                )
            )
            continue
        if not shard.readable:
            continue
        path = local_path(shard.url)
        by_dir.setdefault(str(path.parent), {})[path.name] = shard.samples
    written = []
    for directory, counts in sorted(by_dir.items()):
        try:
            existing = read_sizes(directory) or {}
        except OpenerError:
            existing = {}  # unreadable: replaced by the true counts
        written.append(str(write_sizes(directory, {**existing, **counts})))
    return written
