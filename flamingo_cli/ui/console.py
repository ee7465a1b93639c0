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


def _make_console(stderr: bool) -> Console:
    # rich already honours NO_COLOR and drops colour and live widgets when not on a terminal.
    return Console(stderr=stderr, highlight=False, soft_wrap=False)


console = _make_console(stderr=False)
err_console = _make_console(stderr=True)


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


def print_json(data: Any) -> None:
    """Machine-readable output on stdout: plain JSON, never styled."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()
