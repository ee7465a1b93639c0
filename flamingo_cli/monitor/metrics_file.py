"""Reading `metrics.jsonl` while it may still be written: complete lines only.

A line without its newline is the writer's half-written last line: it is left for the next read
(a tail) or ignored (a one-off read), never an error. A line that is not a JSON object with an
integer `step` (a run killed mid-write, then resumed, leaves one in the middle) is skipped and
counted. The file is read in blocks and a line longer than `MAX_LINE` bytes (no metrics row is;
a sparse or binary file in its place has no newline for gigabytes) is skipped and counted without
being kept, so memory stays bounded whatever the file holds. See docs/formats.md §15.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flamingo_cli.errors import FlamingoError

MAX_LINE = 1 << 20  # bytes: a metrics row is a few hundred; a longer line is not one
BLOCK = 1 << 20  # bytes read at a time


@dataclass
class MetricsRead:
    """The rows read so far, and how many lines could not be used."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0  # complete lines that are not a metrics row
    partial_line: bool = False  # the file ends in a line still being written


def parse_row(line: bytes) -> dict[str, Any] | None:
    """One metrics row, or None when the line is not a JSON object with a `step` of 0 or more."""
    try:
        row: Any = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    return row


class MetricsTail:
    """Follows a metrics file: each `read()` returns the rows completed since the last one.

    A file that shrank or was replaced (a resume moves rows aside and rewrites it) is read again
    from its start; the rows then repeat the steps kept, which callers treat by step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._inode: int | None = None
        self._pending = b""
        self._skipping = False  # inside a line over MAX_LINE bytes, counted, not kept
        self.read_so_far = MetricsRead()

    def read(self) -> list[dict[str, Any]]:
        """New complete rows (an empty list when the file does not exist yet)."""
        rows: list[dict[str, Any]] = []
        try:
            with self.path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_ino != self._inode or stat.st_size < self._offset:
                    self._inode, self._offset, self._pending = stat.st_ino, 0, b""
                    self._skipping = False
                    self.read_so_far = MetricsRead()  # rewritten (a resume): from the top
                handle.seek(self._offset)
                while block := handle.read(BLOCK):
                    self._offset += len(block)
                    rows += self._lines(block)
        except FileNotFoundError:
            return []
        except OSError as error:  # a directory in its place, no permission
            raise FlamingoError(
                f"cannot read {self.path}: {error.strerror or error}",
                fix=f"make {self.path} a readable file (it is the run's metrics, one JSON "
                "object per line)",
            ) from error
        self.read_so_far.rows += rows
        self.read_so_far.partial_line = bool(self._pending.strip())
        return rows

    def _lines(self, block: bytes) -> list[dict[str, Any]]:
        """The rows of the lines `block` completes; the end of an overlong line is dropped
        (the line counted once, when it is over `MAX_LINE`)."""
        lines = (self._pending + block).split(b"\n")
        self._pending = lines.pop()  # b"" after a final newline, else the half-written line
        rows = []
        for line in lines:
            if self._skipping:  # the end of an overlong line, already counted
                self._skipping = False
            elif line.strip():
                row = parse_row(line) if len(line) <= MAX_LINE else None
                if row is None:
                    self.read_so_far.bad_lines += 1
                else:
                    rows.append(row)
        if len(self._pending) > MAX_LINE:
            if not self._skipping:
                self.read_so_far.bad_lines += 1
            self._pending, self._skipping = b"", True
        return rows


def read_metrics(path: Path) -> MetricsRead:
    """Every complete row of a metrics file, in file order; a missing file has none."""
    tail = MetricsTail(path)
    tail.read()
    return tail.read_so_far
