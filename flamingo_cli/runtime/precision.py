"""Precision on this device: which autocast a forward runs under, TF32, and what needs a GPU."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from flamingo_cli.errors import FlamingoError
from flamingo_cli.recipe.schema import Precision, Strategy


def autocast_for(
    precision: Precision, device: torch.device, strategy: Strategy
) -> contextlib.AbstractContextManager[Any]:
    """Autocast for amp_bf16 and fp16 always, for bf16 unless FSDP2 casts the parameters."""
    if precision == "amp_bf16" or (precision == "bf16" and strategy != "fsdp"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def require_gpu_for_fp16(precision: Precision) -> None:
    """fp16 trains with a gradient scaler, which needs a GPU; the other precisions run anywhere."""
    if precision == "fp16" and not torch.cuda.is_available():
        raise FlamingoError(
            'run.precision = "fp16" needs a GPU (it trains with a gradient scaler)',
            fix='use "bf16" or "amp_bf16" on CPUs, or "fp32"',
        )


def use_tf32(precision: Precision, device: torch.device) -> bool:
    """TF32 for the float32 matrix products left on a GPU (frozen float32 parts, the loss's
    upcast logits) when the run trains in a reduced precision, whose own products round
    coarser than TF32; a "fp32" run keeps full float32. True when TF32 is now on."""
    if device.type != "cuda" or precision == "fp32":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True
