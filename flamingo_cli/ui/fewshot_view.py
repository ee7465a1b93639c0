"""`eval-fewshot` output: progress per trial while decoding, then a table of the task's score
at each shot count (mean and std over trials; with an ablation, the score without images)."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from flamingo_cli.ui.console import console, err_console, settings

if TYPE_CHECKING:
    from flamingo_cli.evaluate.fewshot.report import FewshotReport


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fewshot_table(report: FewshotReport, title: str | None = None) -> Table:
    """One row per shot count: samples, mean and std over trials, and the ablation's mean and
    the gap when there is one."""
    table = Table(title=title, title_justify="left")
    for name, justify in (("task", "left"), ("shots", "right"), ("samples", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    trials = int(report.protocol.get("trials", 1))
    table.add_column(f"{report.metric} (mean of {trials})", justify="right")
    table.add_column("std", justify="right")
    if report.ablation:
        removed = "removed" if report.ablation == "none" else "shuffled"
        table.add_column(f"images {removed}", justify="right")
        table.add_column("gap", justify="right")
    for r in report.results:
        row = [report.task, str(r.shots), f"{r.samples:,}", _number(r.mean), _number(r.std)]
        if report.ablation:
            row += [_number(r.ablated_mean), _number(r.gap)]
        table.add_row(*row)
    return table


def render_fewshot_report(report: FewshotReport) -> None:
    """The table on stdout; what was read, how it was scored and where the predictions are
    on stderr."""
    title = f"{report.task} few-shot, {report.checkpoint} ({report.weights})"
    console.print(fewshot_table(report, escape(title)))
    if settings.verbosity >= 0:
        err_console.print(
            f"read {escape(report.layout)}: {escape(', '.join(report.files))}",
            highlight=False,
            style="dim",
        )
        err_console.print(
            f"scored with {escape(report.scorer)}; {report.world_size} rank(s), "
            f"{report.seconds:.1f} s; every prediction in {escape(str(report.predictions))}",
            highlight=False,
            style="dim",
        )


class FewshotDisplay:
    """Receives the evaluation's events (`evaluate.fewshot.runner.FewshotEvents`): a bar per
    trial on a terminal, one line per trial otherwise."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled and settings.verbosity >= 0
        self.live = self.enabled and err_console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> FewshotDisplay:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("batches"),
                console=err_console,
                transient=True,
            )
            self._progress.start()
        return self

    def trial_started(self, shots: int, trial: int, batches: int) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            name = f"{shots}-shot trial {trial + 1}"
            self._task = self._progress.add_task(name, total=batches)

    def batch_done(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)

    def trial_done(self, shots: int, trial: int, score: float, ablated: float | None) -> None:
        if not self.enabled:
            return
        without = "" if ablated is None else f", without images {ablated:.2f}"
        err_console.print(f"{shots}-shot trial {trial + 1}: {score:.2f}{without}", highlight=False)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
