"""Rank 0's view of training (or its launcher's): the live layout on a terminal, plain lines
otherwise."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.live import Live

from flamingo_cli.monitor.live import RunWatch, dataset_names, held_out
from flamingo_cli.monitor.status import newest_checkpoint
from flamingo_cli.ui.console import console, settings
from flamingo_cli.ui.live_view import LiveLayout


def format_metrics(metrics: dict[str, Any]) -> str:
    """The line shown per logged step: losses, lr, grad norm, throughput, data wait."""
    parts = [f"{name} {metrics[f'loss/{name}']:.4f}" for name in dataset_names(metrics)]
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
    """Context manager receiving the training loop's events (see `train.run.TrainEvents`):
    the live layout (ui/live_view.py) on a terminal, one plain line per logged step otherwise
    (and with -q nothing). `run_dir` lets the live view show the newest checkpoint; `now` (wall
    time) and `tick` (the plain lines' ETA clock) are for tests."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        run_name: str = "",
        run_dir: Path | None = None,
        now: Callable[[], float] = time.time,
        tick: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = 0
        self.enabled = enabled and settings.verbosity >= 0
        self.live = console.is_terminal and self.enabled
        self.watch = RunWatch(name=run_name)
        self._run_dir = run_dir
        self._now = now
        self._tick = tick
        self._live: Live | None = None
        self._clock: tuple[float, int] | None = None

    def __enter__(self) -> TrainDisplay:
        return self

    def started(self, total_steps: int, start_step: int) -> None:
        self.total = total_steps
        self.watch.started(total_steps, start_step, self._now())
        if start_step:
            self.message(f"resuming at step {start_step} of {total_steps}")
        if self.live and self._live is None:
            self._note_checkpoint(announce=False)  # the one a resume started from
            self._live = Live(
                LiveLayout(self.watch, self._now),
                console=console,
                refresh_per_second=2,
                transient=False,
            )
            self._live.start()

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        if self._live is not None:
            self._live_step(step, metrics)
        elif self.enabled:
            text = format_metrics(metrics)
            console.print(
                f"step {step}/{self.total}  {text}  eta {self._eta(step)}",
                highlight=False,
                soft_wrap=True,
            )

    def _live_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Fold the step in; say so above the layout when a checkpoint or held-out loss is new."""
        self.watch.add(step, metrics, self._now())
        self._note_checkpoint()
        evals = held_out(metrics)
        if evals:
            losses = "  ".join(f"{name} {loss:.4f}" for name, loss in evals.items())
            self.message(f"held-out loss at step {step}: {losses}")
        if self._live is not None:
            self._live.refresh()

    def _note_checkpoint(self, *, announce: bool = True) -> None:
        """Take in the newest complete checkpoint of the run directory; say so when it is new."""
        if self._run_dir is None:
            return
        newest = newest_checkpoint(self._run_dir)
        if newest is not None and newest.step != self.watch.checkpoint_step:
            self.watch.checkpointed(newest.step, newest.saved_at)
            if announce:
                self.message(f"checkpoint saved at step {newest.step}: {newest.path}")

    def _eta(self, step: int) -> str:
        """Time left at the mean pace of the steps run by this process so far."""
        now = self._tick()
        if self._clock is None:
            self._clock = (now, step)
            return "?"
        started, first = self._clock
        if step <= first:
            return "?"
        left = (now - started) / (step - first) * max(self.total - step, 0)
        return str(datetime.timedelta(seconds=round(left)))

    def message(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, highlight=False, soft_wrap=True)
        elif self.enabled:
            console.print(text, highlight=False, soft_wrap=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._note_checkpoint()  # the last one is saved after the last step
            self._live.refresh()
            self._live.stop()
            self._live = None
