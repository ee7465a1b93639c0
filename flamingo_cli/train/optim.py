"""AdamW over the trainable parameters, weight decay only on gated cross-attention (docs/formats.md §5.6).

On CUDA the optimizer is torch's fused AdamW, which can skip a step on the device (the
`found_inf` tensor GradScaler hands it): a step with a non-finite gradient norm then changes
neither the parameters nor any state, without the host reading the norm (docs/formats.md §12).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

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
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    rule: Callable[[str], bool] = decays,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with OpenFlamingo's decay split and torch's default betas and eps; fused when the
    trainable parameters are on CUDA (`fused` None) or when asked."""
    groups = param_groups(model.named_parameters(), weight_decay, rule)
    if fused is None:
        fused = any(p.is_cuda for group in groups for p in _params(group))
    # fused=None keeps torch's own choice (a for-loop on CPUs), exactly as before
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused else None)


def _params(group: dict[str, object]) -> list[nn.Parameter]:
    params = group["params"]
    assert isinstance(params, list)
    return params


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(bool(group.get("fused")) for group in optimizer.param_groups)


def step_if_finite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
    """`optimizer.step()` unless `grad_norm` is not finite, when nothing changes: no parameter,
    no moment, no step count. A fused optimizer decides on the device (no host sync); another
    reads the norm (free on a CPU)."""
    if not is_fused(optimizer):
        if math.isfinite(float(grad_norm)):
            optimizer.step()
        return
    found_inf = (~torch.isfinite(grad_norm)).float()
    full = getattr(found_inf, "full_tensor", None)  # a DTensor norm: the same flag everywhere
    flag = full() if callable(full) else found_inf
    holder: Any = optimizer  # AdamW reads these two attributes, as GradScaler sets them
    holder.grad_scale, holder.found_inf = None, flag
    try:
        optimizer.step()
    finally:
        del holder.grad_scale, holder.found_inf
