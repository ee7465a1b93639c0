"""Shared consoles and output settings (quiet/verbose, colour, JSON).

The rich consoles are built on first use, so a `--json` run never imports rich (about 50 ms
of start-up that shows against `tar -tf` on small shard sets)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flamingo_cli.units import format_bytes

__all__ = ["configure", "detail", "format_bytes", "info", "print_json", "settings"]

if TYPE_CHECKING:
    from rich.console import Console

    console: Console
    err_console: Console


@dataclass
class OutputSettings:
    verbosity: int = 0  # -1 quiet, 0 normal, 1+ verbose
    debug: bool = False


settings = OutputSettings()


# rich honours NO_COLOR and drops colour and live widgets when not on a terminal. Messages on
# stderr are never wrapped, so a path or key in them stays whole for grep and log readers.
_CONSOLES = ("console", "err_console")


def _console(name: str) -> Console:
    made: Console | None = globals().get(name)
    if made is None:
        from rich.console import Console

        stderr = name == "err_console"
        made = Console(stderr=stderr, highlight=False, soft_wrap=stderr)
        globals()[name] = made
    return made


def __getattr__(name: str) -> Console:
    """`console` and `err_console`, built when first asked for."""
    if name not in _CONSOLES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _console(name)


def configure(*, quiet: bool = False, verbose: int = 0, debug: bool = False) -> None:
    settings.verbosity = -1 if quiet else verbose
    settings.debug = debug or os.environ.get("FLAMINGO_DEBUG", "") not in ("", "0")


def info(message: str) -> None:
    """A status line on stderr, hidden by --quiet."""
    if settings.verbosity >= 0:
        _console("err_console").print(message)


def detail(message: str) -> None:
    """A line shown only with --verbose."""
    if settings.verbosity > 0:
        _console("err_console").print(message, style="dim")


def print_json(data: Any) -> None:
    """Machine-readable output on stdout: plain JSON, never styled; NaN and infinities are
    null (json.dumps would write NaN and Infinity, which JSON parsers refuse)."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float as None, through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
