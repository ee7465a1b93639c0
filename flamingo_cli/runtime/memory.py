"""Running out of device memory, told as what ran out and what to lower (docs/formats.md §12)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from flamingo_cli.errors import DeviceOutOfMemory

# what torch's CPU allocator says when an allocation fails (a RuntimeError, not an OOM error)
_CPU_ALLOCATOR = "DefaultCPUAllocator: can't allocate memory"


@contextmanager
def memory_named(what: str, fix: str, device: torch.device) -> Iterator[None]:
    """Inside the block, running out of memory is a DeviceOutOfMemory: "`device` ran out of
    memory `what` (torch's first line)", with `fix`. The allocator's cached blocks are given
    back first, so what runs next (the message, a rank's exit) has room."""
    try:
        yield
    except RuntimeError as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and _CPU_ALLOCATOR not in str(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeviceOutOfMemory(f"{device} ran out of memory {what} ({said})", fix=fix) from exc
