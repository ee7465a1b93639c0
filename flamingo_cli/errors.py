"""Exception types raised by library code; the CLI renders them without tracebacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One finding about a user's input: where it is, what is wrong, and how to fix it."""

    message: str
    key: str | None = None
    file: str | None = None
    line: int | None = None
    fix: str | None = None
    severity: Severity = "error"
    source: str | None = None  # e.g. "from --set" when the value came from the command line

    @property
    def location(self) -> str:
        """`file:line: key` with the parts that are known."""
        parts: list[str] = []
        if self.file:
            parts.append(f"{self.file}:{self.line}" if self.line else self.file)
        if self.key:
            parts.append(self.key)
        where = ": ".join(parts)
        if self.source:
            where = f"{where} ({self.source})" if where else f"({self.source})"
        return where

    def to_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "key": self.key,
            "file": self.file,
            "line": self.line,
            "source": self.source,
            "message": self.message,
            "fix": self.fix,
        }


class FlamingoError(Exception):
    """Base of every error a user can cause; exit code 1 unless a subclass says otherwise."""

    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


class UsageError(FlamingoError):
    """The command line itself is wrong (exit code 2)."""

    exit_code = 2


class ProblemsFound(FlamingoError):
    """Validation found errors; carries every problem so all are reported at once."""

    def __init__(self, message: str, problems: list[Problem]) -> None:
        super().__init__(message)
        self.problems = problems


class OpenerError(FlamingoError):
    """A shard or file URL could not be opened or read."""


class ConvertError(FlamingoError):
    """Raw data cannot be converted as asked (inputs, output directory, options)."""


class OutputError(FlamingoError):
    """An output file or folder cannot be written (read-only, no permission, something in the
    way): a problem of the output location, so it stops the whole run, not one input."""


class CheckpointDamaged(FlamingoError):
    """A checkpoint directory is incomplete or damaged (a file missing, empty or cut short);
    the caller sets the fix (another checkpoint, `run.resume = PATH`)."""


class CheckpointRefused(FlamingoError):
    """A checkpoint directory holds something flamingo/DCP never writes (code to run on load,
    a data file outside it): refused before anything in it is used."""


class DeviceOutOfMemory(FlamingoError):
    """The device (or the host, for CPU tensors) had no memory left for what was being run;
    the message names the work and the sizes, the fix the setting that lowers them."""
