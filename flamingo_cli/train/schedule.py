"""Learning-rate schedules with linear warmup, counted in optimizer steps."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

Kind = Literal["constant", "linear", "cosine"]


def lr_factor(step: int, *, kind: Kind, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate for the optimizer step about to be taken.

    Warmup rises linearly from 0; `linear` then decays to 0 at `total_steps`, `cosine` follows
    half a cosine to 0, `constant` stays at 1 (the shapes of the transformers schedules
    OpenFlamingo uses, but over optimizer steps rather than batches).
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: Kind, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """A LambdaLR (so its state checkpoints like any scheduler) following `lr_factor`."""
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(step, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps),
    )
