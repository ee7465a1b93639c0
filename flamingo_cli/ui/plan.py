"""The resolved training plan as rich tables."""

from __future__ import annotations

from rich.table import Table

from flamingo_cli.recipe.plan import Plan
from flamingo_cli.ui.console import console, format_bytes


def render_plan(plan: Plan, title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    for dataset in plan.datasets:
        table.add_column(dataset.name, justify="right")

    def row(label: str, values: list[str]) -> None:
        table.add_row(label, *values)

    ds = plan.datasets
    row("shards", [f"{d.shards}" + (" (resampled)" if d.resampled else "") for d in ds])
    row("eval shards", [str(d.eval_shards or "-") for d in ds])
    row(
        "samples in shards",
        [f"{d.total_samples:,}" if d.total_samples is not None else "?" for d in ds],
    )
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
    console.print(table)
    console.print(
        f"world size {plan.world_size} ({plan.nnodes} node(s) x {plan.nproc_per_node} process(es)); "
        f"{plan.batches_per_epoch} batches per epoch, gradient accumulation "
        f"{plan.gradient_accumulation_steps}: {plan.optimizer_steps_per_epoch} optimizer steps "
        f"per epoch x {plan.num_epochs} epoch(s) = {plan.total_optimizer_steps} steps "
        f"({plan.warmup_steps} warmup)"
    )
