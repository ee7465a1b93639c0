"""Shared consoles and output settings (quiet/verbose, colour, JSON)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console


@dataclass
class OutputSettings:
    verbosity: int = 0  # -1 quiet, 0 normal, 1+ verbose
    debug: bool = False


settings = OutputSettings()


# rich honours NO_COLOR and drops colour and live widgets when not on a terminal. Messages on
# stderr are never wrapped, so a path or key in them stays whole for grep and log readers.
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def configure(*, quiet: bool = False, verbose: int = 0, debug: bool = False) -> None:
    settings.verbosity = -1 if quiet else verbose
    settings.debug = debug or os.environ.get("FLAMINGO_DEBUG", "") not in ("", "0")


def info(message: str) -> None:
    """A status line on stderr, hidden by --quiet."""
    if settings.verbosity >= 0:
        err_console.print(message)


def detail(message: str) -> None:
    """A line shown only with --verbose."""
    if settings.verbosity > 0:
        err_console.print(message, style="dim")


def format_bytes(n: float) -> str:
    """Binary units with one decimal: 512 B, 1.5 KiB, 37.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def print_json(data: Any) -> None:
    """Machine-readable output on stdout: plain JSON, never styled."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()
