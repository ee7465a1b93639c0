"""Schedules over optimizer steps and the weight-decay split."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flamingo_cli.train.optim import build_optimizer
from flamingo_cli.train.schedule import build_scheduler, lr_factor


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("constant", [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]),
        (
            "cosine",
            [0.0, 0.25, 0.5, 0.75] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)],
        ),
    ],
)
def test_schedule_shapes(kind: str, expected: list[float]) -> None:
    got = [lr_factor(s, kind=kind, warmup_steps=4, total_steps=10) for s in range(11)]  # type: ignore[arg-type]
    assert got == pytest.approx(expected)


def test_scheduler_steps_with_the_optimizer() -> None:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2.0)
    scheduler = build_scheduler(optimizer, kind="linear", warmup_steps=2, total_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0])


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gated_cross_attn_layer = nn.Linear(2, 2)
        self.perceiver = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_weight_decay_only_on_cross_attention() -> None:
    model = Toy()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {
        id(p) for p in model.gated_cross_attn_layer.parameters()
    }
    assert {id(p) for p in plain["params"]} == {id(p) for p in model.perceiver.parameters()}
