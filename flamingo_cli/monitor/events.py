"""The training events rank 0 sends the `flamingo train` that launched it through torchrun, so
that the launcher shows the same live view as a one-process run (docs/formats.md §15.2).

Rank 0 appends one JSON object per event to a file the launcher names (`--events PATH`):
`{"event": "started", "total_steps": N, "start_step": K}`, `{"event": "step", "step": N,
"metrics": {...}}` (the metrics row as logged) and `{"event": "message", "text": "..."}`. The
launcher follows the file and replays each complete line into its display.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol


class EventSink(Protocol):
    """What receives the replayed events (the training display)."""

    def started(self, total_steps: int, start_step: int) -> None: ...

    def step(self, step: int, metrics: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...


class EventWriter:
    """The events of rank 0 into `path`, a line each, flushed as written (opened on the first
    event, so ranks that report nothing leave no file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def _write(self, event: dict[str, Any]) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(event, default=str) + "\n")
        self._file.flush()

    def started(self, total_steps: int, start_step: int) -> None:
        self._write({"event": "started", "total_steps": total_steps, "start_step": start_step})

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        self._write({"event": "step", "step": step, "metrics": metrics})

    def message(self, text: str) -> None:
        self._write({"event": "message", "text": text})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def replay(line: bytes, sink: EventSink) -> bool:
    """Hand one event line to `sink`; False when the line is not an event we know."""
    try:
        event: Any = json.loads(line)
    except (ValueError, RecursionError):
        return False
    if not isinstance(event, dict):
        return False
    kind = event.get("event")
    try:
        if kind == "started":
            sink.started(int(event["total_steps"]), int(event["start_step"]))
        elif kind == "step" and isinstance(event.get("metrics"), dict):
            sink.step(int(event["step"]), event["metrics"])
        elif kind == "message":
            sink.message(str(event.get("text", "")))
        else:
            return False
    except (KeyError, TypeError, ValueError):  # a field missing or of another type
        return False
    return True


class EventFollower:
    """Follows an events file from a thread, replaying each complete line into `sink`, until
    `stop()`, which replays what is left and waits for the thread."""

    def __init__(self, path: Path, sink: EventSink, interval: float = 0.2) -> None:
        self.path = path
        self.sink = sink
        self.interval = interval
        self._done = threading.Event()
        self._offset = 0
        self._pending = b""
        self._thread = threading.Thread(target=self._run, name="train-events", daemon=True)

    def start(self) -> EventFollower:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.poll()
        self.poll()

    def poll(self) -> None:
        """Replay the lines completed since the last poll."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *lines, self._pending = (self._pending + data).split(b"\n")
        for line in lines:
            if line.strip():
                replay(line, self.sink)

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
