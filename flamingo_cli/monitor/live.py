"""What a watcher knows of a run from its metrics lines: per dataset the last and smoothed loss,
recent losses, rates and drops; the run's step, pace, last checkpoint and held-out losses.

The training display, the launcher of torchrun ranks and `flamingo status` all fold metrics rows
into a `RunWatch`. Datasets are whatever `loss/NAME` keys the rows carry, in their order. Time is
always passed in (seconds since the epoch), never read here, so renders are reproducible.
"""

from __future__ import annotations

import datetime
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

HISTORY = 240  # recent losses kept per dataset, for the sparkline
SMOOTHING = 0.9  # weight of the past in the smoothed loss (debiased, as TensorBoard's)


def dataset_names(metrics: dict[str, Any]) -> list[str]:
    """The datasets a metrics row has a training loss for, in the row's order."""
    return [key.removeprefix("loss/") for key in metrics if key.startswith("loss/")]


def number(metrics: dict[str, Any], key: str) -> float | None:
    """`metrics[key]` as a float, None when absent or not a number."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def held_out(metrics: dict[str, Any]) -> dict[str, float]:
    """The `eval/loss/NAME` values of a row, by dataset."""
    found = {}
    for key in metrics:
        value = number(metrics, key)
        if key.startswith("eval/loss/") and value is not None:
            found[key.removeprefix("eval/loss/")] = value
    return found


def dropped_of(metrics: dict[str, Any], name: str) -> int:
    """Samples of dataset `name` dropped so far, all reasons (`dropped/NAME/REASON`)."""
    prefix = f"dropped/{name}/"
    return sum(int(v) for k, v in metrics.items() if k.startswith(prefix) and _is_count(v))


def _is_count(value: Any) -> bool:
    """A count a row may carry: a number, finite (a damaged row's NaN or 1e400 is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def clock(seconds: float) -> str:
    """A duration as H:MM:SS (days as `Nd H:MM:SS`)."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def ago(seconds: float) -> str:
    """How long ago, in the largest unit that reads well: `12 s`, `4 min`, `2.5 h`."""
    if seconds < 0:
        return "just now"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


@dataclass
class DatasetWatch:
    """One dataset's figures over the rows seen."""

    name: str
    last: float | None = None
    smoothed: float | None = None
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    samples_per_s: float | None = None  # `samples_per_s/NAME`, when the rows have it
    tokens_per_s: float | None = None
    dropped: int = 0
    held_out: float | None = None
    _ema: float = 0.0
    _seen: int = 0

    def add(self, metrics: dict[str, Any]) -> None:
        loss = number(metrics, f"loss/{self.name}")
        if loss is not None:
            self.last = loss
            self.recent.append(loss)
            self._seen += 1
            self._ema = SMOOTHING * self._ema + (1 - SMOOTHING) * loss
            self.smoothed = self._ema / (1 - SMOOTHING**self._seen)
        self.samples_per_s = number(metrics, f"samples_per_s/{self.name}")
        self.tokens_per_s = number(metrics, f"tokens_per_s/{self.name}")
        self.dropped = dropped_of(metrics, self.name)


@dataclass
class RunWatch:
    """A run as its metrics rows tell it; `started` and `add` are fed in order."""

    name: str = ""
    total_steps: int | None = None
    start_step: int = 0
    step: int = 0
    started_at: float | None = None
    datasets: dict[str, DatasetWatch] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)  # the newest row
    held_out_step: int | None = None
    checkpoint_step: int | None = None
    checkpoint_at: float | None = None
    rows: int = 0  # rows folded in
    rates: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))  # samples/s
    _pace_from: tuple[float, int] | None = None

    def started(self, total_steps: int | None, start_step: int, now: float) -> None:
        self.total_steps = total_steps
        self.start_step = self.step = start_step
        self.started_at = now

    def add(self, step: int, metrics: dict[str, Any], now: float | None = None) -> None:
        """Fold in the row of `step` (logged at `now`, when known). An eval-only row (held-out
        losses at a step that logged nothing else, docs/formats.md §9.3) keeps the last full
        row's figures."""
        self.step = max(self.step, step)
        self.rows += 1
        if now is not None and self._pace_from is None:
            self._pace_from = (now, step)
        names = dataset_names(metrics)
        if names:
            for name in names:
                self.datasets.setdefault(name, DatasetWatch(name))
            for watch in self.datasets.values():
                watch.add(metrics)
            rate = number(metrics, "samples_per_s")
            if rate is not None:
                self.rates.append(rate)
            self.last = dict(metrics)
        evals = held_out(metrics)
        if evals:
            self.held_out_step = step
            for name, loss in evals.items():
                self.datasets.setdefault(name, DatasetWatch(name)).held_out = loss

    def checkpointed(self, step: int, at: float) -> None:
        self.checkpoint_step, self.checkpoint_at = step, at

    @property
    def epoch(self) -> int | None:
        value = number(self.last, "epoch")
        return None if value is None or not math.isfinite(value) else int(value)

    def elapsed(self, now: float) -> float | None:
        return None if self.started_at is None else now - self.started_at

    def eta(self, now: float) -> float | None:
        """Seconds left at the mean pace of the steps seen since the first one (None before
        two steps, or without a total)."""
        if self._pace_from is None or self.total_steps is None:
            return None
        since, first = self._pace_from
        if self.step <= first:
            return None
        return (now - since) / (self.step - first) * max(self.total_steps - self.step, 0)

    def fraction(self) -> float | None:
        if not self.total_steps:
            return None
        return min(self.step / self.total_steps, 1.0)
