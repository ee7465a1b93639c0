"""`flamingo quickstart` output: a numbered line per stage, then the losses and the verdict."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from flamingo_cli.ui.console import console, err_console, settings
from flamingo_cli.ui.eval_view import loss_table

if TYPE_CHECKING:
    from flamingo_cli.quickstart import QuickstartResult, StageResult


class StageLines:
    """Announces each stage as `[k/n] name: what` and its summary when it ends (stderr)."""

    def __init__(self, stages: tuple[str, ...], *, enabled: bool = True) -> None:
        self.stages = stages
        self.enabled = enabled and settings.verbosity >= 0

    def started(self, name: str, what: str) -> None:
        if self.enabled:
            number = self.stages.index(name) + 1 if name in self.stages else 0
            err_console.print(f"[bold cyan][{number}/{len(self.stages)}] {name}[/]: {escape(what)}")

    def finished(self, stage: StageResult) -> None:
        if self.enabled:
            err_console.print(
                f"  [green]done[/] {escape(stage.summary)} [dim]({stage.seconds:.1f} s)[/]"
            )


def _render_captions(result: QuickstartResult) -> None:
    """Each held-out image's caption beside the true one, then CIDEr with and without images."""
    report = result.captioning
    if report is None or not report.results:
        return
    table = Table(title="Held-out images captioned (eval-fewshot, 0 shots)", title_justify="left")
    table.add_column("image", overflow="fold")
    for name in ("true caption", "caption", "caption, images removed"):
        table.add_column(name)
    for c in result.captions:
        table.add_row(
            escape(Path(c.image).name),
            escape(c.reference),
            escape(c.caption),
            escape(c.without_images),
        )
    console.print(table)
    shot = report.results[0]
    without = shot.ablated_mean or 0.0
    ratio = f" ({shot.mean / without:.1f}x)" if without > 0 else ""
    console.print(
        f"CIDEr {shot.mean:.1f} with images, {without:.1f} without{ratio}.", highlight=False
    )


def render_quickstart(result: QuickstartResult) -> None:
    """Held-out losses with and without images, the gap against its threshold, what to try next."""
    if result.evaluation is not None:
        console.print(
            loss_table(result.evaluation.datasets, "Held-out loss, with and without images")
        )
    _render_captions(result)
    gap = result.caption_gap
    shown = "-" if gap is None else f"{gap:.3f}"
    if result.passed:
        console.print(
            f"[bold green]The model uses the images[/]: on held-out captions they are worth "
            f"{shown} nats per token (at least {result.min_gap} expected), "
            f"in {result.seconds:.0f} s."
        )
    else:
        console.print(
            f"[bold red]The images are worth only {shown} nats per caption token[/] "
            f"(at least {result.min_gap} expected)."
        )
    runs = result.directory / "runs"
    console.print(
        f"Everything is under {escape(str(result.directory))}: raw/ (generated downloads), "
        f"shards/ (converted), runs/ (checkpoints, metrics.jsonl, export/).",
        soft_wrap=True,
    )
    console.print(
        f"Evaluate again: flamingo eval-loss {escape(str(result.recipe))} --checkpoint "
        f"{escape(str(runs / 'tiny-cpu' / 'export' / 'flamingo.pt'))} --shards "
        f"{escape(str(result.directory / 'shards' / 'laion-heldout'))} --dataset laion "
        "--ablate-images shuffle",
        soft_wrap=True,
        highlight=False,
    )
