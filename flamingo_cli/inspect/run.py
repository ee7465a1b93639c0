"""`inspect-shards` as a library call: expand specs or a recipe, scan in parallel, compare
with sizes.json, optionally rewrite it. Returns an InspectReport; never prints.

On one node of several (`Partition`) only its shards are scanned and the sizes.json checks
wait for `merge_reports`, which joins the nodes' JSON reports into the report of one run."""

from __future__ import annotations

import json
import multiprocessing
import os
import posixpath
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flamingo_cli.errors import OpenerError, OutputError, UsageError
from flamingo_cli.inspect.document import Filters
from flamingo_cli.inspect.report import Finding, GroupReport, InspectReport, ShardReport
from flamingo_cli.inspect.scan import ScanSettings, scan_shard
from flamingo_cli.shards.cluster import Partition, RayOptions, ray_map
from flamingo_cli.shards.opener import open_url
from flamingo_cli.shards.sizes import SIZES_FILE, read_sizes
from flamingo_cli.shards.spec import expand_spec, local_path, url_kind
from flamingo_cli.shards.write import write_sizes

if TYPE_CHECKING:
    from flamingo_cli.recipe.schema import DatasetConfig, Source

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
    partition: Partition = field(default_factory=Partition)
    ray: RayOptions | None = None
    max_image_pixels: int | None = None  # None: a recipe's data.max_image_pixels, else default


@dataclass(frozen=True)
class ShardGroup:
    """Shards to inspect with the same settings, under one name in the report. From a recipe:
    the dataset, and for a blend's source its name and its share of the dataset's draws."""

    name: str
    urls: list[str]
    settings: ScanSettings
    dataset: str | None = None
    source: str | None = None
    share: float | None = None

    def origin(self) -> dict[str, Any]:
        """Where the group comes from, for the report."""
        return {"dataset": self.dataset, "source": self.source, "share": self.share}


def _base_settings(options: InspectOptions) -> ScanSettings:
    filters = Filters(max_image_pixels=options.max_image_pixels)
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
    """The training and eval shards of each dataset of a recipe, with its filters: one group
    each for a dataset given by `shards`, one each per source of a blend (`NAME/SOURCE`)."""
    from flamingo_cli.recipe.load import load_recipe

    recipe = load_recipe(path).recipe
    pixels = options.max_image_pixels or recipe.data.max_image_pixels
    base = _base_settings(options)
    base = replace(
        base,
        allow_pipe=options.allow_pipe or recipe.data.allow_pipe,
        filters=replace(base.filters, max_image_pixels=pixels),
    )
    groups = []
    for name, config in recipe.datasets().items():
        settings = _dataset_settings(base, name, config, options.sim_threshold)
        sources = config.source_list(name)
        total = sum(s.weight for s in sources)
        for source in sources:
            groups += _source_groups(name, source, settings, source.weight / total)
    if not groups:
        raise UsageError(
            f"recipe {path} has no dataset with shards",
            fix="give a [data.NAME] table `shards` or [[data.NAME.sources]] tables",
        )
    return groups


def _source_groups(
    dataset: str, source: Source, settings: ScanSettings, share: float
) -> list[ShardGroup]:
    """A source's training and eval groups: `NAME` for a dataset's own shards, `NAME/SOURCE`
    (its kind findings naming the source) for a blend's."""
    where: dict[str, Any] = {"dataset": dataset}
    label = dataset
    if source.blended:
        label = f"{dataset}/{source.name}"
        where.update(source=source.name, share=share)
        settings = replace(settings, dataset=f"data.{dataset} (source {source.name})")
    groups = [ShardGroup(f"{label} training", expand_spec(source.shards), settings, **where)]
    if source.eval_shards:
        urls = expand_spec(source.eval_shards)
        groups.append(ShardGroup(f"{label} eval", urls, settings, **where))
    return groups


def _dataset_settings(
    base: ScanSettings, name: str, config: DatasetConfig, sim_threshold: float | None
) -> ScanSettings:
    """The scan settings of one recipe dataset: its kind, token limit and filters."""
    from flamingo_cli.recipe.schema import InterleavedConfig

    settings = replace(
        base, max_tokens=config.max_tokens, expected_kind=config.kind, dataset=f"data.{name}"
    )
    if not isinstance(config, InterleavedConfig):
        return settings
    threshold = config.textsim_threshold if sim_threshold is None else sim_threshold
    filters = Filters(
        threshold=threshold,
        assignment=config.assignment,
        max_num_images=config.max_num_images,
        min_num_images=config.min_num_images,
        max_image_pixels=base.filters.max_image_pixels,
    )
    return replace(settings, filters=filters)


def inspect_shards(
    groups: Sequence[ShardGroup],
    options: InspectOptions,
    progress: Progress | None = None,
) -> InspectReport:
    """Scan every shard once (in parallel), check sizes.json, and write it when asked.

    With a split `options.partition`, scan this node's shards (positions p of the deduplicated
    shard list with p % count == rank) and leave the sizes.json checks to `merge_reports`.
    """
    tasks = list(dict.fromkeys((url, g.settings) for g in groups for url in g.urls))
    node = options.partition
    if node.split and options.write_sizes:
        raise UsageError(
            "--write-sizes on one node of several would race with the other nodes",
            fix="pass --write-sizes to `inspect-shards --merge` instead",
        )
    reports = _scan_all(node.select(tasks), options, progress)
    report = InspectReport(
        [
            GroupReport(
                g.name,
                [reports[(u, g.settings)] for u in g.urls if (u, g.settings) in reports],
                g.settings.expected_kind,
                planned=list(g.urls) if node.split else None,
                **g.origin(),
            )
            for g in groups
        ],
        max_errors=options.max_errors,
        node=node.to_dict() if node.split else None,
    )
    if node.split:
        return report
    return _finish_sizes(report, options)


def _finish_sizes(report: InspectReport, options: InspectOptions) -> InspectReport:
    shards = report.unique_shards()
    _check_sizes(shards, options)
    if options.write_sizes:
        report.sizes_written = _write_sizes(shards)
    return report


def _scan_task(task: tuple[str, ScanSettings]) -> ShardReport:
    """One shard on a Ray worker."""
    return scan_shard(*task)


def _scan_all(
    tasks: list[tuple[str, ScanSettings]], options: InspectOptions, progress: Progress | None
) -> dict[tuple[str, ScanSettings], ShardReport]:
    workers = min(options.workers or os.cpu_count() or 1, len(tasks))
    results: dict[tuple[str, ScanSettings], ShardReport] = {}
    if options.ray is not None and tasks:
        done = ray_map(
            _scan_task,
            tasks,
            options.ray,
            None if progress is None else lambda _i, report: progress(report),
        )
        return dict(zip(tasks, done, strict=True))
    if workers <= 1:
        for task in tasks:
            results[task] = scan_shard(*task)
            if progress:
                progress(results[task])
        return results
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
        written.append(_write_sizes_file(directory, {**existing, **counts}))
    return written


def _write_sizes_file(directory: str, counts: dict[str, int]) -> str:
    """Write one sizes.json; a location that refuses it stops the run, naming the file."""
    target = posixpath.join(directory, SIZES_FILE)
    try:
        return str(write_sizes(directory, counts))
    except (OSError, OutputError) as exc:
        if isinstance(exc, OutputError):
            message = exc.message
        else:
            message = f"cannot write {target}: {exc.strerror or exc}"
        if Path(target).is_dir():
            fix = f"remove or rename the folder {target}, which is in the way of the file"
        else:
            fix = f"make {directory} writable (or copy the shards to a writable place)"
        raise OutputError(message, fix=f"{fix}, or run without --write-sizes") from exc


def _load_report(source: str, allow_pipe: bool) -> dict[str, Any]:
    try:
        with open_url(source, allow_pipe=allow_pipe) as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(
            f"{source} is not a JSON report ({exc})",
            fix="give the files written by `inspect-shards --json` on each node",
        ) from exc
    if not isinstance(data, dict) or "groups" not in data:
        raise UsageError(
            f"{source} is not an inspect-shards JSON report",
            fix="give the files written by `inspect-shards --json` on each node",
        )
    return data


def merge_reports(sources: Sequence[str], options: InspectOptions) -> InspectReport:
    """One report from the JSON reports of every node: shards in the order of one run,
    sizes.json checked (and written with `options.write_sizes`) as one run would."""
    reports = [_load_report(s, options.allow_pipe) for s in sources]
    if not reports:
        raise UsageError("--merge needs the nodes' JSON reports", fix="pass report-*.json")
    nodes = [r.get("node") or {"count": 1, "rank": 0} for r in reports]
    count = int(nodes[0]["count"])
    ranks = sorted(int(n["rank"]) for n in nodes)
    if any(int(n["count"]) != count for n in nodes) or ranks != list(range(count)):
        missing = sorted(set(range(count)) - set(ranks))
        raise UsageError(
            f"the reports are not one per node of {count}: ranks {ranks}"
            + (f", missing {missing}" if missing else ""),
            fix="pass exactly one report of every node rank (rerun the missing nodes)",
        )
    names = [[g["name"] for g in r["groups"]] for r in reports]
    if any(n != names[0] for n in names):
        raise UsageError(
            "the reports inspect different shard groups",
            fix="run every node with the same SPECs or --recipe",
        )
    cache: dict[tuple[str, str], ShardReport] = {}
    groups = []
    for index, name in enumerate(names[0]):
        found: dict[str, ShardReport] = {}
        plan: dict[str, Any] = {}
        for report in reports:
            group = report["groups"][index]
            plan = group.get("plan") or plan
            findings: dict[str, list[Finding]] = {}
            for item in report["findings"]:
                findings.setdefault(item["shard"], []).append(Finding.from_dict(item))
            for data in group["shards"]:
                key = (data["shard"], json.dumps(data, sort_keys=True))
                if key not in cache:
                    shard = ShardReport.from_dict(data, options.max_errors)
                    shard.findings = findings.get(shard.url, [])
                    cache[key] = shard
                found[data["shard"]] = cache[key]
        urls = plan.get("shards") or list(found)
        absent = [u for u in urls if u not in found]
        if absent:
            raise UsageError(
                f"group {name!r}: no report holds {len(absent)} of its shards "
                f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''})",
                fix="pass the report of every node",
            )
        origin = {k: reports[0]["groups"][index].get(k) for k in ("dataset", "source", "share")}
        shards = [found[u] for u in urls]
        groups.append(GroupReport(name, shards, plan.get("expected_kind"), **origin))
    merged = InspectReport(groups, max_errors=options.max_errors)
    return _finish_sizes(merged, options)
