"""A device read that transformers' mask building makes and our training forward does not need
(docs/formats.md §12)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

_PACKED_CHECK = "find_packed_sequence_indices"


def _not_packed(position_ids: Tensor) -> None:
    """The check's answer for position ids 0..T-1 in every row: no packed sequences."""
    return None


@contextmanager
def positions_not_packed() -> Iterator[None]:
    """For one LM forward given no mask and no position ids: transformers (5.x) then makes the
    ids 0..T-1 itself and asks the device whether they mark packed sequences (a host sync whose
    answer is known: they do not). Answers it without the read; nothing else changes. A no-op
    where transformers has no such check (4.x)."""
    module = sys.modules.get("transformers.masking_utils")
    found = getattr(module, _PACKED_CHECK, None)
    if module is None or found is None:
        yield
        return
    setattr(module, _PACKED_CHECK, _not_packed)
    try:
        yield
    finally:
        setattr(module, _PACKED_CHECK, found)
