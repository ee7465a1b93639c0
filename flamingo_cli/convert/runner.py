"""What both converters share: tasks, per-task manifest records, resume, worker processes.

A conversion is a list of independent tasks, each writing its own shards (names derived from
its input only) and then a record under `manifest.d/`. Any subset of tasks can run anywhere
(one worker, N processes, later N machines choosing a subset of inputs) into one directory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from flamingo_cli.errors import ConvertError, FlamingoError, OpenerError, Problem
from flamingo_cli.shards.sizes import SIZES_FILE
from flamingo_cli.shards.write import TMP_MARKER, write_json_atomic, write_sizes

MANIFEST_FILE = "manifest.json"
RECORDS_DIR = "manifest.d"
MAX_PROBLEMS_PER_TASK = 50  # listed in a record; the counts stay exact

Status = Literal["converted", "complete", "missing", "failed"]


@dataclass(frozen=True)
class ShardRecord:
    """One finished output shard and the statistics of the input that went into it."""

    name: str
    samples: int
    bytes: int
    stats: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, **self.stats}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardRecord:
        stats = {k: int(v) for k, v in data.items() if k not in ("name", "samples", "bytes")}
        return cls(str(data["name"]), int(data["samples"]), int(data["bytes"]), stats)


@dataclass
class TaskRecord:
    """What one task did: its shards, its counts and the problems it met."""

    name: str
    input: str
    fingerprint: dict[str, object]
    status: Status
    shards: list[ShardRecord] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    problems_total: int = 0

    def problem(self, problem: Problem) -> None:
        """Keep a problem (the first few are listed; all are counted)."""
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS_PER_TASK:
            self.problems.append(problem)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "input": self.input,
            "fingerprint": self.fingerprint,
            "status": self.status,
            "shards": [s.to_dict() for s in self.shards],
            "counts": dict(sorted(self.counts.items())),
            "problems": [p.to_dict() for p in self.problems],
            "problems_total": self.problems_total,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskRecord:
        return cls(
            name=str(data["name"]),
            input=str(data["input"]),
            fingerprint=dict(data["fingerprint"]),
            status=data["status"],
            shards=[ShardRecord.from_dict(s) for s in data["shards"]],
            counts=Counter({str(k): int(v) for k, v in data["counts"].items()}),
            problems=[Problem(**p) for p in data["problems"]],
            problems_total=int(data["problems_total"]),
        )


class ProgressSink(Protocol):
    def __call__(self, work: int, samples: int, image_bytes: int) -> None:
        """Report work units done (input bytes or samples), samples written, image bytes read."""


class Task(Protocol):
    """One independent unit of conversion: reads its inputs, writes its own shards."""

    @property
    def name(self) -> str: ...

    @property
    def input(self) -> str: ...

    @property
    def weight(self) -> int: ...  # progress units (0 when unknown)

    def fingerprint(self) -> dict[str, object]: ...

    def output_names(self) -> list[str]: ...  # glob patterns of the files it writes (clean-up)

    def run(self, out_dir: Path, progress: ProgressSink) -> TaskRecord: ...


@dataclass
class ProgressState:
    """Totals so far, handed to the progress callback."""

    work_done: int = 0
    work_total: int = 0
    samples: int = 0
    image_bytes: int = 0
    tasks_done: int = 0
    tasks_total: int = 0


ProgressCallback = Callable[[ProgressState], None]


@dataclass
class ConvertReport:
    """The outcome of a conversion: per-task records (this run's tasks, in input order)."""

    kind: str
    out_dir: Path
    records: list[TaskRecord]
    reused: list[str]
    elapsed_s: float
    strict_keys: tuple[str, ...]

    @property
    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for record in self.records:
            total.update(record.counts)
        total["shards"] = sum(len(r.shards) for r in self.records)
        total["shard_bytes"] = sum(s.bytes for r in self.records for s in r.shards)
        total["inputs"] = len(self.records)
        total["inputs_missing"] = sum(r.status == "missing" for r in self.records)
        total["inputs_failed"] = sum(r.status == "failed" for r in self.records)
        total["inputs_reused"] = len(self.reused)
        return total

    @property
    def problems(self) -> list[Problem]:
        return [p for r in self.records for p in r.problems]

    @property
    def skipped(self) -> int:
        """Inputs, lines or samples left out because of a problem (what `--strict` fails on)."""
        totals = self.totals
        return sum(totals[k] for k in ("inputs_missing", "inputs_failed", *self.strict_keys))

    def to_dict(self) -> dict[str, object]:
        totals = self.totals
        return {
            "kind": self.kind,
            "out_dir": str(self.out_dir),
            "elapsed_s": round(self.elapsed_s, 3),
            "totals": dict(sorted(totals.items())),
            "skipped": self.skipped,
            "inputs": [
                {
                    "name": r.name,
                    "input": r.input,
                    "status": "complete" if r.name in self.reused else r.status,
                    "shards": [s.to_dict() for s in r.shards],
                    "counts": dict(sorted(r.counts.items())),
                    "problems_total": r.problems_total,
                }
                for r in self.records
            ],
            "problems": [p.to_dict() for p in self.problems],
            "manifest": str(self.out_dir / MANIFEST_FILE),
            "sizes": str(self.out_dir / SIZES_FILE),
        }


def _record_path(out_dir: Path, name: str) -> Path:
    return out_dir / RECORDS_DIR / f"{name}.json"


def load_record(out_dir: Path, name: str) -> TaskRecord | None:
    path = _record_path(out_dir, name)
    if not path.is_file():
        return None
    try:
        return TaskRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError):
        return None  # a damaged record means the task is redone


def _complete(out_dir: Path, record: TaskRecord) -> bool:
    """Every shard the record lists exists with the size it had when written."""
    for shard in record.shards:
        path = out_dir / shard.name
        if not path.is_file() or path.stat().st_size != shard.bytes:
            return False
    return True


def _clean(out_dir: Path, task: Task, old: TaskRecord | None) -> None:
    """Remove what an earlier, unfinished or outdated run of `task` left behind."""
    _record_path(out_dir, task.name).unlink(missing_ok=True)
    for pattern in task.output_names():
        for tmp in sorted(out_dir.glob(f".{pattern}{TMP_MARKER}*")):
            tmp.unlink(missing_ok=True)
    if old is not None:
        for shard in old.shards:
            (out_dir / shard.name).unlink(missing_ok=True)


def _run_one(task: Task, out_dir: Path, progress: ProgressSink) -> TaskRecord:
    """Run a task; a user-level error (unreadable input) fails this task, not the run."""
    try:
        record = task.run(out_dir, progress)
    except FlamingoError as exc:
        record = TaskRecord(task.name, task.input, task.fingerprint(), "failed")
        record.problem(Problem(exc.message, file=task.input, fix=exc.fix))
        return record
    if record.status == "converted":
        write_json_atomic(_record_path(out_dir, task.name), record.to_dict())
    return record


# Worker processes report progress through this queue (set by the pool initializer).
_WORKER: dict[str, Any] = {}
_FLUSH_S = 0.2


def _init_worker(progress_queue: Any) -> None:
    _WORKER["queue"] = progress_queue


class _QueueSink:
    """Batches progress increments and sends them to the parent a few times a second."""

    def __init__(self) -> None:
        self.pending = [0, 0, 0]
        self.last = time.monotonic()

    def __call__(self, work: int, samples: int, image_bytes: int) -> None:
        self.pending[0] += work
        self.pending[1] += samples
        self.pending[2] += image_bytes
        if time.monotonic() - self.last > _FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if any(self.pending):
            _WORKER["queue"].put(tuple(self.pending))
            self.pending = [0, 0, 0]
        self.last = time.monotonic()


def _run_in_worker(task: Task, out_dir: Path) -> TaskRecord:
    sink = _QueueSink()
    try:
        return _run_one(task, out_dir, sink)
    finally:
        sink.flush()


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def check_unique_names(tasks: Sequence[Task]) -> None:
    """Two inputs with the same stem would write the same shard names: refuse before writing."""
    seen: dict[str, str] = {}
    for task in tasks:
        if task.name in seen:
            raise ConvertError(
                f"inputs {seen[task.name]} and {task.input} both give shards named {task.name!r}",
                fix="convert them into different --out directories, or rename one input file",
            )
        seen[task.name] = task.input


def run_tasks(
    tasks: Sequence[Task],
    out_dir: str | Path,
    *,
    kind: str,
    workers: int | None = None,
    overwrite: bool = False,
    on_progress: ProgressCallback | None = None,
    strict_keys: tuple[str, ...] = (),
) -> ConvertReport:
    """Run every task not already complete in `out_dir`, then write `manifest.json` and sizes.

    A task is complete when its record matches its fingerprint and every shard it lists has the
    recorded size; `overwrite` redoes everything. One task runs in exactly one worker process.
    """
    start = time.monotonic()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file", fix="give a directory")
    check_unique_names(tasks)
    (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)

    old_records = {t.name: load_record(out, t.name) for t in tasks}
    if not overwrite:  # refuse before touching anything
        for task in tasks:
            old = old_records[task.name]
            if old is not None and old.fingerprint != task.fingerprint():
                raise ConvertError(
                    f"{out} already holds shards of {task.input} converted with other options "
                    f"or inputs (record {_record_path(out, task.name)})",
                    fix="pass --overwrite to redo them, or choose another --out directory",
                )
    done: dict[str, TaskRecord] = {}
    pending: list[Task] = []
    for task in tasks:
        old = old_records[task.name]
        if old is not None and not overwrite and _complete(out, old):
            done[task.name] = old
            continue
        _clean(out, task, old)
        pending.append(task)

    state = ProgressState(
        work_total=sum(t.weight for t in tasks),
        tasks_total=len(tasks),
        tasks_done=len(done),
        work_done=sum(t.weight for t in tasks if t.name in done),
    )

    def report(work: int, samples: int, image_bytes: int) -> None:
        state.work_done += work
        state.samples += samples
        state.image_bytes += image_bytes
        if on_progress is not None:
            on_progress(state)

    report(0, 0, 0)
    results: dict[str, TaskRecord] = {}
    n = min(workers or default_workers(), len(pending))
    if n <= 1:
        for task in pending:
            results[task.name] = _run_one(task, out, report)
            state.tasks_done += 1
            report(0, 0, 0)
    else:
        results.update(_run_pool(pending, out, n, state, report))

    state.work_done = state.work_total  # weights are estimates: show the bar full at the end
    report(0, 0, 0)
    reused = list(done)
    records = [done.get(t.name) or results[t.name] for t in tasks]
    write_manifest(out, kind)
    return ConvertReport(kind, out, records, reused, time.monotonic() - start, strict_keys)


def _run_pool(
    pending: Sequence[Task],
    out: Path,
    n: int,
    state: ProgressState,
    report: ProgressSink,
) -> dict[str, TaskRecord]:
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    results: dict[str, TaskRecord] = {}

    def drain() -> None:
        while True:
            try:
                work, samples, image_bytes = progress_queue.get_nowait()
            except queue.Empty:
                return
            report(work, samples, image_bytes)

    with ProcessPoolExecutor(
        n, mp_context=context, initializer=_init_worker, initargs=(progress_queue,)
    ) as pool:
        futures: dict[Future[TaskRecord], Task] = {
            pool.submit(_run_in_worker, task, out): task for task in pending
        }
        try:
            remaining = set(futures)
            while remaining:
                finished, remaining = wait(remaining, timeout=0.1, return_when=FIRST_COMPLETED)
                drain()
                for future in finished:
                    results[futures[future].name] = future.result()
                    state.tasks_done += 1
                report(0, 0, 0)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    drain()
    progress_queue.close()
    return results


def write_manifest(out: Path, kind: str) -> dict[str, object]:
    """Gather every record in `out` (any run, any machine) into manifest.json and sizes.json."""
    records = []
    for path in sorted((out / RECORDS_DIR).glob("*.json")):
        record = load_record(out, path.stem)
        if record is not None and record.status == "converted" and _complete(out, record):
            records.append(record)
    shards = {s.name: {"input": r.input, **s.to_dict()} for r in records for s in r.shards}
    manifest: dict[str, object] = {
        "kind": kind,
        "shards": dict(sorted(shards.items())),
        "inputs": {
            r.name: {
                "input": r.input,
                "fingerprint": r.fingerprint,
                "shards": [s.name for s in r.shards],
                "counts": dict(sorted(r.counts.items())),
                "problems_total": r.problems_total,
            }
            for r in records
        },
    }
    write_json_atomic(out / MANIFEST_FILE, manifest)
    write_sizes(out, {name: int(s["samples"]) for name, s in sorted(shards.items())})  # type: ignore[call-overload]
    return manifest


def open_error_is_missing(exc: OpenerError) -> bool:
    """Whether an opener error means the file does not exist (as opposed to unreadable)."""
    return isinstance(exc.__cause__, FileNotFoundError)
