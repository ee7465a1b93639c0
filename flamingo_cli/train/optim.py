"""AdamW over the trainable parameters, weight decay only on gated cross-attention (docs/formats.md §5.6)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

DECAY_MARKER = "gated_cross_attn"


def decays(name: str) -> bool:
    """OpenFlamingo decays exactly the parameters whose name contains `gated_cross_attn`."""
    return DECAY_MARKER in name


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    rule: Callable[[str], bool] = decays,
) -> list[dict[str, object]]:
    """Two AdamW groups over trainable parameters: decayed by `rule`, and the rest at 0."""
    with_decay: list[nn.Parameter] = []
    without: list[nn.Parameter] = []
    for name, param in named:
        if param.requires_grad:
            (with_decay if rule(name) else without).append(param)
    return [
        {"params": with_decay, "weight_decay": weight_decay},
        {"params": without, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, rule: Callable[[str], bool] = decays
) -> torch.optim.AdamW:
    """AdamW with OpenFlamingo's decay split and torch's default betas and eps."""
    return torch.optim.AdamW(param_groups(model.named_parameters(), weight_decay, rule), lr=lr)
