"""The resolved training plan as rich tables: the datasets side by side (at most
DATASETS_PER_TABLE per table, so the plan fits 80 columns), then the sources of blends."""

from __future__ import annotations

from rich.table import Table

from flamingo_cli.recipe.plan import DatasetPlan, Plan, SourcePlan
from flamingo_cli.ui.console import console, format_bytes

DATASETS_PER_TABLE = 3


def render_plan(plan: Plan, title: str) -> None:
    ds = plan.datasets
    chunks = [ds[i : i + DATASETS_PER_TABLE] for i in range(0, len(ds), DATASETS_PER_TABLE)]
    for number, chunk in enumerate(chunks or [()]):
        console.print(_datasets_table(chunk, title if number == 0 else f"{title} (continued)"))
    if any(s.blended for d in ds for s in d.sources):
        console.print(_sources_table(ds))
    console.print(
        f"world size {plan.world_size} ({plan.nnodes} node(s) x {plan.nproc_per_node} process(es)); "
        f"{plan.batches_per_epoch} batches per epoch, gradient accumulation "
        f"{plan.gradient_accumulation_steps}: {plan.optimizer_steps_per_epoch} optimizer steps "
        f"per epoch x {plan.num_epochs} epoch(s) = {plan.total_optimizer_steps} steps "
        f"({plan.warmup_steps} warmup)"
    )


def _datasets_table(ds: tuple[DatasetPlan, ...], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    for dataset in ds:
        table.add_column(dataset.name, justify="right")

    def row(label: str, values: list[str]) -> None:
        table.add_row(label, *values)

    row("kind", [d.kind for d in ds])
    row("shards", [f"{d.shards}" + (" (resampled)" if d.resampled else "") for d in ds])
    row("eval shards", [str(d.eval_shards or "-") for d in ds])
    row("samples in shards", [_count(d.total_samples) for d in ds])
    row("samples per epoch", [f"{d.samples_per_epoch:,}" for d in ds])
    row("batch size per rank", [str(d.batch_size) for d in ds])
    row("global batch per step", [str(d.global_batch) for d in ds])
    row("batches per rank per epoch", [str(d.batches_per_rank) for d in ds])
    row("samples drawn per epoch", [f"{d.samples_drawn_per_epoch:,}" for d in ds])
    row("loader workers per rank", [str(d.workers) for d in ds])
    row("shards per worker", [f"{d.shards_per_worker:.2f}" for d in ds])
    row(
        "shuffle buffers per node (est.)",
        [format_bytes(d.shuffle_buffer_bytes_per_node) for d in ds],
    )
    row("image batch per rank", [format_bytes(d.batch_pixel_bytes) for d in ds])
    return table


def _blended(dataset: DatasetPlan) -> bool:
    return any(s.blended for s in dataset.sources)


def _count(value: int | None) -> str:
    return f"{value:,}" if value is not None else "?"


def _sources_table(ds: tuple[DatasetPlan, ...]) -> Table:
    """A row per blended dataset and, under it, a row per source (docs/formats.md §7.3)."""
    resampled = any(s.resampled for d in ds if _blended(d) for s in d.sources)
    table = Table(
        title="Sources of blended datasets",
        title_justify="left",
        caption="* resampled" if resampled else None,
        caption_justify="left",
    )
    table.add_column("source", overflow="fold")
    for label in ("weight", "share", "shards", "shards/worker", "drawn/epoch", "passes"):
        table.add_column(label, justify="right", no_wrap=True)
    for dataset in ds:
        if not _blended(dataset):
            continue
        table.add_row(
            dataset.name,
            "",
            "",
            str(dataset.shards),
            f"{dataset.shards_per_worker:.2f}",
            f"{dataset.samples_drawn_per_epoch:,}",
            "",
            style="bold",
        )
        for source in dataset.sources:
            table.add_row(*_source_row(source))
    return table


def _source_row(source: SourcePlan) -> list[str]:
    passes = source.passes_per_epoch
    return [
        f"  {source.name}",
        f"{source.weight:g}",
        f"{source.share:.0%}" if source.share >= 0.01 else f"{source.share:.2%}",
        f"{source.shards}" + ("*" if source.resampled else ""),
        f"{source.shards_per_worker:.2f}",
        f"~{source.samples_drawn_per_epoch:,}",
        f"{passes:.2f}" if passes is not None else "?",
    ]
