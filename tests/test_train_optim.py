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


class Inf(nn.Module):
    """A model whose loss has an infinite gradient on the first call."""

    def __init__(self) -> None:
        super().__init__()
        self.gated_cross_attn = nn.Linear(2, 1)
        self.calls = 0

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> object:
        self.calls += 1
        scale = float("inf") if self.calls == 1 else 1.0
        out = self.gated_cross_attn(images.flatten(1)[:, :2]).sum() * scale

        class Output:
            loss = out

        return Output()


def test_non_finite_gradient_norm_skips_the_step() -> None:
    from dataclasses import dataclass

    from flamingo_cli.runtime.distributed import DistInfo
    from flamingo_cli.train.loop import LoopConfig, optimizer_step

    @dataclass
    class B:
        images: torch.Tensor
        input_ids: torch.Tensor
        attention_mask: torch.Tensor
        labels: torch.Tensor

    model = Inf()
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, kind="constant", warmup_steps=0, total_steps=2)
    config = LoopConfig(1, {"laion": 1.0}, 1.0, "fp32")
    config.flops.per_sample["laion"] = 4.0  # counted: the first call is the step's own
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    batch = B(torch.ones(1, 1, 2), torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    before = [p.detach().clone() for p in model.parameters()]
    first = optimizer_step(model, [{"laion": batch}], optimizer, scheduler, config, info, "none")
    assert first.skipped and not math.isfinite(first.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    second = optimizer_step(model, [{"laion": batch}], optimizer, scheduler, config, info, "none")
    assert not second.skipped
    assert not torch.equal(before[0], model.gated_cross_attn.weight)


def test_plain_progress_lines_show_metrics_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    from flamingo_cli.ui.train_view import TrainDisplay

    metrics = {"loss/laion": 2.5, "loss/mmc4": 3.25, "lr": 1e-4, "grad_norm": 0.5, "data_wait": 0.1}
    with TrainDisplay() as display:
        assert not display.live  # pytest's stdout is not a terminal
        display.started(total_steps=4, start_step=0)
        display.step(1, metrics)
        display.step(2, metrics)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "step 1/4  laion 2.5000  mmc4 3.2500  lr 1.00e-04  gnorm 0.500  data wait 10%  eta ?"
    )
    assert lines[1].startswith("step 2/4  laion 2.5000") and " eta 0:00:0" in lines[1]
