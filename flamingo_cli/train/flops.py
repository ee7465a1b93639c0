"""Utilisation of the training step: model FLOPs per sample, the device's peak, peak memory
(docs/formats.md §12).

FLOPs are counted once, by torch's FlopCounterMode on an extra forward and backward of the
first batch of each dataset (train/loop.py `_count_flops`), as the step runs them: frozen
towers have no weight gradient, right padding is cut off; with gradient checkpointing the
recomputed forward counts too. A logged step's model FLOPs are then each dataset's FLOPs per sample times the samples it took.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense (not sparse) bf16 tensor-core peak of one device in TFLOP/s, from the vendors' data
# sheets; the first name contained in the device's name wins, so longer names come first
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 125.0),  # AWS's A10 variant, rated as the A10
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX A6000", 155.0),
    ("RTX 4090", 165.0),  # fp32 accumulation, as training uses
    ("RTX 3090", 71.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


def known_peak_tflops(device_name: str) -> float | None:
    """The table's peak for a device name as CUDA reports it; None for one not in it."""
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in device_name:
            return tflops
    return None


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """`run.peak_tflops` when set, else the table's figure for this GPU (None on a CPU or an
    unknown device: no mfu then)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    return known_peak_tflops(torch.cuda.get_device_name(device))


class StepFlops:
    """FLOPs per sample of each dataset, counted on a pass over its first batch."""

    def __init__(self) -> None:
        self.per_sample: dict[str, float] = {}

    @contextlib.contextmanager
    def counting(self, name: str, samples: int) -> Iterator[None]:
        """Count the forward and backward run inside, the first time `name` comes (eagerly:
        compiled code would hide its operations from the counter)."""
        if name in self.per_sample:
            yield
            return
        counter = FlopCounterMode(display=False)
        with torch.compiler.set_stance("force_eager"), counter:
            yield
        self.per_sample[name] = counter.get_total_flops() / max(samples, 1)

    def of(self, samples: Mapping[str, int]) -> float | None:
        """Model FLOPs of these samples per dataset; None when a dataset was never counted."""
        if not samples or any(name not in self.per_sample for name in samples):
            return None
        return sum(self.per_sample[name] * count for name, count in samples.items())


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak of allocated memory on a GPU (a CPU's peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """On a GPU, the most tensor memory allocated since `reset_peak_memory` (one step); on a
    CPU, the process's largest resident set so far (getrusage; None where it does not exist)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # not on this system
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak * 1024 / 2**30
