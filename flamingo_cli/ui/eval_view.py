"""`eval-loss` output: progress per dataset while evaluating, then the loss table."""

from __future__ import annotations

import math
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from flamingo_cli.ui.console import console, err_console, settings

if TYPE_CHECKING:
    from flamingo_cli.evaluate.loss import DatasetLoss
    from flamingo_cli.evaluate.run import EvalReport


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _ppl(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _rows(results: list[DatasetLoss]) -> list[DatasetLoss]:
    """Each dataset's row followed by its sources' rows (`--by-source`)."""
    return [row for r in results for row in (r, *r.sources)]


def loss_table(results: list[DatasetLoss], title: str | None = None) -> Table:
    """Dataset, samples, target tokens, loss, perplexity; with an ablation its loss and gap.
    A blend's source rows (`NAME/SOURCE`) follow their dataset's, dimmed."""
    ablation = next((r.ablation for r in results if r.ablation), None)
    table = Table(title=title, title_justify="left")
    table.add_column("dataset")
    for name in ("samples", "tokens", "loss", "ppl"):
        table.add_column(name, justify="right")
    if ablation:
        table.add_column(
            f"loss, images {'removed' if ablation == 'none' else 'shuffled'}", justify="right"
        )
        table.add_column("gap", justify="right")
    for r in _rows(results):
        row = [
            r.dataset,
            f"{r.samples:,}",
            f"{r.target_tokens:,}",
            _number(r.loss),
            _ppl(r.perplexity),
        ]
        if ablation:
            row += [_number(r.ablated_loss), _number(r.gap)]
        table.add_row(*row, style="dim" if r.source else None)
    return table


def render_eval_report(report: EvalReport) -> None:
    """The loss table on stdout; notes (drops, shuffle exclusions) on stderr."""
    title = f"Held-out loss of {report.checkpoint} ({report.weights}, {report.world_size} rank(s))"
    console.print(loss_table(report.datasets, escape(title)))
    for r in _rows(report.datasets):
        if r.note:
            err_console.print(f"[yellow]note[/]: {r.dataset}: {escape(r.note)}")
        if r.dropped and settings.verbosity >= 0:
            dropped = ", ".join(f"{k} {v}" for k, v in r.dropped.items())
            err_console.print(f"{r.dataset}: dropped by preprocessing: {dropped}", style="dim")


class EvalDisplay:
    """Receives the evaluation's events (see `evaluate.loss.EvalEvents`): on a terminal a bar
    per dataset with its batches, samples and running loss (rank 0's); one line per dataset
    otherwise. `console` is for tests (stderr's by default)."""

    def __init__(self, *, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled and settings.verbosity >= 0
        self._console = console or err_console
        self.live = self.enabled and self._console.is_terminal
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> EvalDisplay:
        if self.live:
            self._progress = Progress(
                TextColumn("eval {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("batches  {task.fields[samples]} samples  loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                console=self._console,
                transient=True,
            )
            self._progress.start()
        return self

    def dataset_started(self, name: str, expected_batches: int | None) -> None:
        if self._progress is not None:
            self._tasks[name] = self._progress.add_task(
                escape(name), total=expected_batches, samples="0", loss="-"
            )

    def batch_done(self, name: str, batches: int, samples: int, loss: float) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.update(
                self._tasks[name], completed=batches, samples=f"{samples:,}", loss=_number(loss)
            )

    def dataset_done(self, result: DatasetLoss) -> None:
        if not self.enabled:
            return
        self._console.print(
            f"eval {result.dataset}: {result.samples:,} samples, {result.target_tokens:,} "
            f"tokens, loss {_number(result.loss)} in {result.seconds:.1f} s",
            highlight=False,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
