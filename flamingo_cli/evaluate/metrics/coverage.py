"""What every scorer checks first: something to score, and a reference for each prediction."""

from __future__ import annotations

from collections.abc import Container, Hashable, Mapping
from typing import TypeVar

from flamingo_cli.errors import FlamingoError

K = TypeVar("K", bound=Hashable)


def check_covered(
    predictions: Mapping[K, object],
    references: Container[K],
    *,
    nothing: tuple[str, str],
    unmatched: tuple[str, str],
) -> None:
    """Raise unless `predictions` is non-empty and each of its keys is in `references`.
    `nothing` and `unmatched` are (message, fix); the second message follows a count of the
    unmatched keys, and five of them are named after it."""
    if not predictions:
        raise FlamingoError(nothing[0], fix=nothing[1])
    missing = [key for key in predictions if key not in references]
    if missing:
        shown = ", ".join(repr(key) for key in missing[:5])
        raise FlamingoError(f"{len(missing)} {unmatched[0]}, e.g. {shown}", fix=unmatched[1])
