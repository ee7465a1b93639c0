"""`flamingo inspect-shards`: audit shards fast from tar headers, or decode every sample."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flamingo_cli.cli.common import (
    JsonOption,
    NodeRankOption,
    NumNodesOption,
    RayAddressOption,
    RayOption,
    cluster_options,
    command,
    user_errors,
)

if TYPE_CHECKING:
    from flamingo_cli.inspect.report import InspectReport
    from flamingo_cli.inspect.run import InspectOptions, ShardGroup

# recipe.schema's DEFAULT_MAX_IMAGE_PIXELS, written out: importing the schema would load
# pydantic in every run (a test checks the two agree)
MAX_IMAGE_PIXELS_HELP = "40,000,000"


def register(app: typer.Typer) -> None:
    command(app, "inspect-shards")(inspect_shards)


# Long for its option declarations only: the body is the steps (_merge, _scan, _show).
def inspect_shards(
    specs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SPEC...",
            help="Shards: brace patterns, globs, directories, `a::b`, local paths or URLs.",
            show_default=False,
        ),
    ] = None,
    deep: Annotated[
        bool,
        typer.Option("--deep", help="Decode every sample: JSON, base64, images, texts, matrices."),
    ] = False,
    json_: JsonOption = False,
    write_sizes: Annotated[
        bool,
        typer.Option("--write-sizes", help="Write or update sizes.json from the counts."),
    ] = False,
    preview: Annotated[
        Path | None,
        typer.Option(
            "--preview",
            dir_okay=False,
            metavar="FILE",
            help="Write one self-contained HTML page showing samples as the model sees them.",
        ),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Samples in the preview.")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Seed that picks the preview samples.")] = 0,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            dir_okay=False,
            help="Inspect the recipe's training and eval shards with its filters.",
        ),
    ] = None,
    sim_threshold: Annotated[
        float | None,
        typer.Option(
            "--sim-threshold",
            help="Image-sentence similarity threshold (default: the recipe's, else 0.24).",
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", metavar="PATH", help="Count tokens with this tokenizer."),
    ] = None,
    max_errors: Annotated[
        int, typer.Option("--max-errors", min=1, help="List at most this many findings.")
    ] = 1000,
    allow_pipe: Annotated[
        bool,
        typer.Option("--allow-pipe", help="Allow `pipe:` specs (they run shell commands)."),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Processes scanning shards (default: CPU count)."),
    ] = None,
    max_image_pixels: Annotated[
        int | None,
        typer.Option(
            "--max-image-pixels",
            min=1,
            metavar="N",
            help="Images declaring more pixels (width x height) are reported as damaged, not "
            "decoded (default: the recipe's data.max_image_pixels, else "
            f"{MAX_IMAGE_PIXELS_HELP}).",
        ),
    ] = None,
    num_nodes: NumNodesOption = None,
    node_rank: NodeRankOption = None,
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="The arguments are the nodes' --json reports: join them into one report "
            "(sizes.json is checked, and written with --write-sizes, here).",
            rich_help_panel="Many machines",
        ),
    ] = False,
) -> None:
    """Count samples and find damaged shards; with --deep, find every sample that fails.

    Fast mode reads only tar headers. On several nodes (--num-nodes, Slurm, torchrun) each scans its part: save each node's --json output and join them with `inspect-shards --merge REPORT...`.

    Exit 0 when no errors were found, 1 when some were, 2 on usage errors.
    """
    from flamingo_cli.errors import UsageError
    from flamingo_cli.inspect.run import InspectOptions, groups_from_recipe, groups_from_specs

    with user_errors(json_):
        if not specs and recipe is None:
            raise UsageError(
                "give shard SPECs or --recipe RECIPE",
                fix="flamingo inspect-shards 'shards/{00000..00009}.tar'",
            )
        if merge:
            options = InspectOptions(
                write_sizes=write_sizes, max_errors=max_errors, allow_pipe=allow_pipe
            )
            _show(_merge(specs or [], recipe is not None or preview is not None, options), json_)
            return
        partition, ray_options = cluster_options(num_nodes, node_rank, ray, ray_address)
        if partition.split and preview is not None:
            raise UsageError(
                "--preview on one node of several would show only its part",
                fix="make the preview in a separate run without --num-nodes",
            )
        options = InspectOptions(
            deep=deep,
            write_sizes=write_sizes,
            sim_threshold=sim_threshold,
            tokenizer=tokenizer,
            max_errors=max_errors,
            allow_pipe=allow_pipe,
            workers=workers,
            partition=partition,
            ray=ray_options,
            max_image_pixels=max_image_pixels,
        )
        groups = groups_from_specs(specs or [], options)
        if recipe is not None:
            groups += groups_from_recipe(recipe, options)
        report = _scan(groups, options, json_)
        if preview is not None:
            from flamingo_cli.inspect.preview import write_preview

            write_preview(report, groups, preview, samples=samples, seed=seed)
            report.preview = str(preview)
        _show(report, json_)


def _merge(reports: list[str], other_inputs: bool, options: InspectOptions) -> InspectReport:
    """Join the nodes' --json reports; --recipe and --preview have no place in a merge."""
    from flamingo_cli.errors import UsageError
    from flamingo_cli.inspect.run import merge_reports

    if not reports or other_inputs:
        raise UsageError(
            "--merge takes the nodes' JSON reports as arguments (no --recipe/--preview)",
            fix="flamingo inspect-shards --merge reports/node-*.json",
        )
    return merge_reports(reports, options)


def _scan(groups: list[ShardGroup], options: InspectOptions, json_: bool) -> InspectReport:
    """Scan the groups' shards, under a progress bar unless the output is JSON."""
    from flamingo_cli.inspect.run import inspect_shards as run_inspect

    if json_:
        return run_inspect(groups, options)
    from flamingo_cli.ui.inspect import shard_progress

    urls = list(dict.fromkeys(url for group in groups for url in group.urls))
    with shard_progress(len(options.partition.select(urls))) as progress:
        return run_inspect(groups, options, progress)


def _show(report: InspectReport, json_: bool) -> None:
    """Print the report (JSON or tables) and exit 1 when it found problems.

    rich is imported only for tables: a `--json` run skips its start-up cost."""
    if json_:
        from flamingo_cli.ui.console import print_json

        print_json(report.to_dict())
    else:
        from flamingo_cli.ui.inspect import render_report

        render_report(report)
    if not report.ok:
        raise typer.Exit(1)
