"""Rank 0's view of training: a live progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import datetime
import time
from types import TracebackType
from typing import Any

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from flamingo_cli.ui.console import console, settings


def format_metrics(metrics: dict[str, Any]) -> str:
    """The line shown per logged step: losses, lr, grad norm, throughput, data wait."""
    parts = [
        f"{name} {metrics[f'loss/{name}']:.4f}"
        for name in ("laion", "mmc4")
        if f"loss/{name}" in metrics
    ]
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "grad_norm" in metrics:
        parts.append(f"gnorm {metrics['grad_norm']:.3f}")
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    if "data_wait" in metrics:
        parts.append(f"data wait {100 * metrics['data_wait']:.0f}%")
    held_out = [
        f"{k.removeprefix('eval/loss/')} {v:.4f}"
        for k, v in metrics.items()
        if k.startswith("eval/loss/")
    ]
    if held_out:
        parts.append("eval " + " ".join(held_out))
    return "  ".join(parts)


class TrainDisplay:
    """Context manager receiving the training loop's events (see `train.run.TrainEvents`)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.total = 0
        self.enabled = enabled and settings.verbosity >= 0
        self.live = console.is_terminal and self.enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._clock: tuple[float, int] | None = None

    def __enter__(self) -> TrainDisplay:
        return self

    def started(self, total_steps: int, start_step: int) -> None:
        self.total = total_steps
        if start_step:
            self.message(f"resuming at step {start_step} of {total_steps}")
        if self.live:
            self._progress = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[metrics]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self.total, completed=start_step, metrics=""
            )

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        text = format_metrics(metrics)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, metrics=text)
        elif self.enabled:
            console.print(
                f"step {step}/{self.total}  {text}  eta {self._eta(step)}",
                highlight=False,
                soft_wrap=True,
            )

    def _eta(self, step: int) -> str:
        """Time left at the mean pace of the steps run by this process so far."""
        now = time.monotonic()
        if self._clock is None:
            self._clock = (now, step)
            return "?"
        started, first = self._clock
        if step <= first:
            return "?"
        left = (now - started) / (step - first) * max(self.total - step, 0)
        return str(datetime.timedelta(seconds=round(left)))

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, highlight=False, soft_wrap=True)
        elif self.enabled:
            console.print(text, highlight=False, soft_wrap=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
