"""Reading `metrics.jsonl` while it may still be written: complete lines only.

A line without its newline is the writer's half-written last line: it is left for the next read
(a tail) or ignored (a one-off read), never an error. A line that is not a JSON object with an
integer `step` (a run killed mid-write, then resumed, leaves one in the middle) is skipped and
counted. See docs/formats.md §15.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flamingo_cli.errors import FlamingoError


@dataclass
class MetricsRead:
    """The rows read so far, and how many lines could not be used."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0  # complete lines that are not a metrics row
    partial_line: bool = False  # the file ends in a line still being written


def parse_row(line: bytes) -> dict[str, Any] | None:
    """One metrics row, or None when the line is not a JSON object with an integer `step`."""
    try:
        row: Any = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
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
        self.read_so_far = MetricsRead()

    def read(self) -> list[dict[str, Any]]:
        """New complete rows (an empty list when the file does not exist yet)."""
        try:
            with self.path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_ino != self._inode or stat.st_size < self._offset:
                    self._inode, self._offset, self._pending = stat.st_ino, 0, b""
                    self.read_so_far = MetricsRead()  # rewritten (a resume): from the top
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        except OSError as error:  # a directory in its place, no permission
            raise FlamingoError(
                f"cannot read {self.path}: {error.strerror or error}",
                fix=f"make {self.path} a readable file (it is the run's metrics, one JSON "
                "object per line)",
            ) from error
        self._offset += len(data)
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()  # b"" after a final newline, else the half-written line
        rows = []
        for line in lines:
            if not line.strip():
                continue
            row = parse_row(line)
            if row is None:
                self.read_so_far.bad_lines += 1
            else:
                rows.append(row)
        self.read_so_far.rows += rows
        self.read_so_far.partial_line = bool(self._pending.strip())
        return rows


def read_metrics(path: Path) -> MetricsRead:
    """Every complete row of a metrics file, in file order; a missing file has none."""
    tail = MetricsTail(path)
    tail.read()
    return tail.read_so_far
