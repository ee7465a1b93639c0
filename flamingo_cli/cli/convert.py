"""`flamingo convert mmc4|laion`: raw downloads to training shards (parallel, resumable)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Literal

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
    from flamingo_cli.convert.images import ImageOptions
    from flamingo_cli.convert.runner import ConvertReport, RunOptions

convert_app = typer.Typer(
    name="convert",
    help="Convert raw MMC4 / LAION downloads into WebDataset training shards.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


class Layout(str, Enum):
    by_index = "index"
    shard_number = "shard-number"
    flat = "flat"


class Reencode(str, Enum):
    none = "none"
    jpeg = "jpeg"


def register(app: typer.Typer) -> None:
    app.add_typer(convert_app, name="convert")


OutOption = Annotated[
    str,
    typer.Option(
        "--out",
        "-o",
        help="Output directory or fsspec URL (s3://bucket/mmc4, gs://...) for the shards.",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option("--workers", "-w", min=1, help="Worker processes (default: all cores)."),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Redo every shard instead of resuming.")
]
StrictOption = Annotated[
    bool,
    typer.Option("--strict", help="Exit 1 when anything was skipped (inputs, lines, samples)."),
]
ReencodeOption = Annotated[
    Reencode,
    typer.Option("--reencode", help="Keep original image bytes (none) or re-encode to JPEG."),
]
QualityOption = Annotated[
    int, typer.Option("--quality", min=1, max=100, help="JPEG quality with --reencode jpeg.")
]
MaxSideOption = Annotated[
    int | None,
    typer.Option("--max-side", min=1, help="With --reencode jpeg: shrink the longer side to N."),
]
# The default is DEFAULT_MAX_IMAGE_PIXELS (recipe/schema.py, not imported here: start-up time).
MaxPixelsOption = Annotated[
    int | None,
    typer.Option(
        "--max-image-pixels",
        min=1,
        help="Skip images over N pixels (width x height, read from the header) as too large "
        "(default 40,000,000).",
        show_default=False,
    ),
]


def _image_options(
    reencode: Reencode, quality: int, max_side: int | None, max_pixels: int | None
) -> ImageOptions:
    from flamingo_cli.convert.images import ImageOptions
    from flamingo_cli.data.image_limits import DEFAULT_MAX_IMAGE_PIXELS
    from flamingo_cli.errors import UsageError

    if max_side is not None and reencode is Reencode.none:
        raise UsageError("--max-side needs --reencode jpeg", fix="add --reencode jpeg")
    return ImageOptions(
        reencode="jpeg" if reencode is Reencode.jpeg else "none",
        quality=quality,
        max_side=max_side,
        max_pixels=DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels,
    )


def _run_options(
    workers: int | None,
    overwrite: bool,
    num_nodes: int | None,
    node_rank: int | None,
    ray: bool,
    ray_address: str | None,
) -> RunOptions:
    """How the conversion runs: processes, resume, this node's part, Ray."""
    from flamingo_cli.convert.runner import RunOptions

    partition, ray_options = cluster_options(num_nodes, node_rank, ray, ray_address)
    return RunOptions(workers, overwrite, partition=partition, ray=ray_options)


def _convert(
    kind: Literal["mmc4", "laion"],
    convert: Callable[[RunOptions], ConvertReport],
    run: RunOptions,
    json_: bool,
    strict: bool,
) -> None:
    """Run a conversion under a progress bar (none with --json), then report it."""
    from flamingo_cli.ui.convert import convert_progress

    unit = "docs" if kind == "mmc4" else "samples"
    with convert_progress(kind, unit, enabled=not json_) as progress:
        report = convert(dataclasses.replace(run, on_progress=progress))
    _finish(report, json_, strict)


def _finish(report: ConvertReport, json_: bool, strict: bool) -> None:
    from flamingo_cli.ui import console as ui
    from flamingo_cli.ui.convert import render_convert_report

    if json_:
        ui.print_json(report.to_dict())
    else:
        render_convert_report(report)
    totals = report.totals
    if (
        totals["inputs"]
        and totals["inputs_missing"] == totals["inputs"]
        and not report.partition.split
    ):
        # Local inputs were checked before; here remote ones (s3://...) that all were absent.
        ui.err_console.print(
            f"[bold red]error[/]: none of the {totals['inputs']} input(s) exists; nothing was "
            "converted (check the paths, and write ranges in brace syntax: shard_{0..9}.tar)"
        )
        raise typer.Exit(1)
    failed = totals["inputs_failed"]
    if failed or (strict and report.skipped):
        if not json_:
            reason = f"{failed} input(s) failed" if failed else f"{report.skipped} item(s) skipped"
            ui.err_console.print(f"[bold red]error[/]: {reason}")
        raise typer.Exit(1)


# The conversion commands are long only for their option declarations; the body is
# _run_options, the converter's options and _convert.
@command(convert_app, "mmc4")
def mmc4(
    docs_spec: Annotated[
        list[str],
        typer.Argument(
            metavar="DOCS_SPEC",
            help="Document files: brace spec of .zip (one .jsonl each) or .jsonl, '::' joins "
            "specs; several arguments are joined the same way.",
        ),
    ],
    image_dir: Annotated[
        str, typer.Option("--image-dir", help="MMC4 image folder (<image_dir>/<idx>/<name>).")
    ],
    out: OutOption,
    image_layout: Annotated[
        Layout,
        typer.Option(
            "--image-layout",
            help="index: <image_dir>/<position in DOCS_SPEC>/, shard-number: "
            "<image_dir>/<N of shard_N>/, flat: <image_dir>/.",
        ),
    ] = Layout.by_index,
    workers: WorkersOption = None,
    docs_per_shard: Annotated[
        int | None,
        typer.Option("--docs-per-shard", min=1, help="Split each input into shards of N docs."),
    ] = None,
    max_shard_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-shard-bytes", min=1, help="Split each input into shards of <= N bytes."
        ),
    ] = None,
    min_images: Annotated[
        int, typer.Option("--min-images", min=0, help="Drop documents with fewer images found.")
    ] = 0,
    drop_url_duplicates: Annotated[
        bool,
        typer.Option(
            "--drop-url-duplicates", help="Drop documents with could_have_url_duplicate = 1."
        ),
    ] = False,
    reencode: ReencodeOption = Reencode.none,
    quality: QualityOption = 95,
    max_side: MaxSideOption = None,
    max_image_pixels: MaxPixelsOption = None,
    overwrite: OverwriteOption = False,
    strict: StrictOption = False,
    json_: JsonOption = False,
    num_nodes: NumNodesOption = None,
    node_rank: NodeRankOption = None,
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
) -> None:
    """Convert raw MMC4 documents and images into interleaved tar shards.

    Each input file gives <stem>.tar (<stem>-<k>.tar when split), one <stem>-<line>.json sample per document, with image_base64 added to every image found. Also writes sizes.json and manifest.json; a rerun skips complete shards. With several nodes (--num-nodes, Slurm, torchrun) each converts its part and `flamingo convert merge OUT` writes the manifest.

    Exit 0 on success, 1 when an input failed (or, with --strict, anything was skipped), 2 on usage errors.
    """
    with user_errors(json_):
        from flamingo_cli.convert.mmc4 import Mmc4Options, convert_mmc4

        run = _run_options(workers, overwrite, num_nodes, node_rank, ray, ray_address)
        options = Mmc4Options(
            image_dir=image_dir,
            image_layout=image_layout.value,
            image=_image_options(reencode, quality, max_side, max_image_pixels),
            min_images=min_images,
            drop_url_duplicates=drop_url_duplicates,
            docs_per_shard=docs_per_shard,
            max_shard_bytes=max_shard_bytes,
        )
        spec = "::".join(docs_spec)
        _convert("mmc4", lambda run: convert_mmc4(spec, out, options, run), run, json_, strict)


@command(convert_app, "laion")
def laion(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="img2dataset output (folder or brace spec of .tar), a folder of images with "
            ".txt captions, or a .csv/.tsv/.parquet/.jsonl table of (image, caption).",
        ),
    ],
    out: OutOption,
    workers: WorkersOption = None,
    samples_per_shard: Annotated[
        int | None,
        typer.Option(
            "--samples-per-shard",
            min=1,
            help="img2dataset input: split each tar into shards of N; folder/table: N per shard "
            "(default 10000).",
        ),
    ] = None,
    image_column: Annotated[
        str | None, typer.Option("--image-column", help="Table column with image paths.")
    ] = None,
    caption_column: Annotated[
        str | None, typer.Option("--caption-column", help="Table column with captions.")
    ] = None,
    reencode: ReencodeOption = Reencode.none,
    quality: QualityOption = 95,
    max_side: MaxSideOption = None,
    max_image_pixels: MaxPixelsOption = None,
    overwrite: OverwriteOption = False,
    strict: StrictOption = False,
    json_: JsonOption = False,
    num_nodes: NumNodesOption = None,
    node_rank: NodeRankOption = None,
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
) -> None:
    """Convert image-caption pairs into img2dataset-layout tar shards (image, .txt, .json).

    Checks img2dataset tars against their _stats.json and drops samples without an image or caption. Also writes sizes.json and manifest.json; a rerun skips complete shards. With several nodes (--num-nodes, Slurm, torchrun) each converts its part and `flamingo convert merge OUT` writes the manifest.

    Exit 0 on success, 1 when an input failed (or, with --strict, anything was skipped), 2 on usage errors.
    """
    with user_errors(json_):
        from flamingo_cli.convert.laion import LaionOptions, convert_laion

        run = _run_options(workers, overwrite, num_nodes, node_rank, ray, ray_address)
        options = LaionOptions(
            image=_image_options(reencode, quality, max_side, max_image_pixels),
            samples_per_shard=samples_per_shard,
            image_column=image_column,
            caption_column=caption_column,
        )
        _convert("laion", lambda run: convert_laion(src, out, options, run), run, json_, strict)


@command(convert_app, "merge")
def merge(
    out: Annotated[
        str,
        typer.Argument(metavar="OUT", help="The --out location every node converted into."),
    ],
    allow_incomplete: Annotated[
        bool,
        typer.Option(
            "--allow-incomplete",
            help="Write manifest.json and sizes.json of the finished inputs even when some "
            "are not (still exit 0).",
        ),
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Assemble manifest.json and sizes.json from the records every node wrote.

    Checks each input of the conversion (plan.json): inputs that do not exist are warnings; inputs not converted yet, failed or with damaged shards are listed by name.

    Exit 0 when every input is done, 1 when some are not (nothing written unless --allow-incomplete), 2 on usage errors.
    """
    with user_errors(json_):
        from flamingo_cli.convert.runner import merge_outputs
        from flamingo_cli.ui import console as ui
        from flamingo_cli.ui.convert import render_merge_report

        report = merge_outputs(out, allow_incomplete=allow_incomplete)
        if json_:
            ui.print_json(report.to_dict())
        else:
            render_merge_report(report)
        if not report.ok and not allow_incomplete:
            raise typer.Exit(1)
