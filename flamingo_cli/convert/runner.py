"""What both converters share: tasks, per-task manifest records, resume, workers, nodes.

A conversion is a list of independent tasks, each writing its own shards (names derived from
its input only) and then a record under `manifest.d/`. Any subset of tasks can run anywhere
(one worker, N processes, N machines each taking a `Partition`, a Ray cluster) into one output
location; `plan.json` lists every task, so `merge_outputs` can tell what is still missing.
"""

from __future__ import annotations

import fnmatch
import glob
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

from braceexpand import braceexpand

from flamingo_cli.errors import ConvertError, FlamingoError, OpenerError, OutputError, Problem
from flamingo_cli.shards.cluster import Partition, RayOptions, ray_map
from flamingo_cli.shards.sizes import SIZES_FILE
from flamingo_cli.shards.spec import local_path, split_spec, url_kind
from flamingo_cli.shards.store import OutputDir, join_url, open_output
from flamingo_cli.shards.write import TMP_MARKER, json_bytes

MANIFEST_FILE = "manifest.json"
PLAN_FILE = "plan.json"
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

    def run(self, dest: OutputDir, progress: ProgressSink) -> TaskRecord: ...


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
    """The outcome of a conversion: per-task records (this node's tasks, in input order)."""

    kind: str
    out_dir: str
    records: list[TaskRecord]
    reused: list[str]
    elapsed_s: float
    strict_keys: tuple[str, ...]
    partition: Partition = field(default_factory=Partition)
    manifest_written: bool = True  # False on one node of several: `convert merge` writes it

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
            "node": self.partition.to_dict(),
            "manifest": join_url(self.out_dir, MANIFEST_FILE) if self.manifest_written else None,
            "sizes": join_url(self.out_dir, SIZES_FILE) if self.manifest_written else None,
        }


def _record_name(name: str) -> str:
    return f"{RECORDS_DIR}/{name}.json"


def _parse_record(raw: bytes | None) -> TaskRecord | None:
    if raw is None:
        return None
    try:
        return TaskRecord.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError, RecursionError):
        return None  # a damaged record means the task is redone


def load_records(out: OutputDir, names: Sequence[str]) -> dict[str, TaskRecord]:
    """The readable records of the tasks called `names` (one read for all of them)."""
    raw = out.read([_record_name(n) for n in names])
    found = {}
    for name in names:
        record = _parse_record(raw.get(_record_name(name)))
        if record is not None:
            found[name] = record
    return found


def _complete(sizes: Mapping[str, int], record: TaskRecord) -> bool:
    """A finished conversion whose shards all exist with the sizes they had when written."""
    return record.status == "converted" and all(sizes.get(s.name) == s.bytes for s in record.shards)


def _clean(out: OutputDir, task: Task, old: TaskRecord | None, temporaries: list[str]) -> None:
    """Remove what an earlier, unfinished or outdated run of `task` left behind.

    `temporaries` are the temporary files of the output location (listed once for all tasks).
    """
    if old is not None:
        out.remove([_record_name(task.name), *(shard.name for shard in old.shards)])
    patterns = [f".{pattern}{TMP_MARKER}*" for pattern in task.output_names()]
    patterns.append(f"{RECORDS_DIR}/.{task.name}.json{TMP_MARKER}*")
    out.remove([n for n in temporaries if any(fnmatch.fnmatchcase(n, p) for p in patterns)])


def _run_one(task: Task, out: OutputDir, progress: ProgressSink) -> TaskRecord:
    """Run a task and record its outcome; a user-level error (unreadable input) fails this
    task, not the run. Records of missing or failed inputs let a merge name them."""
    try:
        record = task.run(out, progress)
    except OutputError:  # the output location, not this input: stop the run
        raise
    except FlamingoError as exc:
        record = TaskRecord(task.name, task.input, task.fingerprint(), "failed")
        record.problem(Problem(exc.message, file=task.input, fix=exc.fix))
    out.write_json(_record_name(task.name), record.to_dict())
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


def _run_in_worker(task: Task, out: OutputDir) -> TaskRecord:
    sink = _QueueSink()
    try:
        return _run_one(task, out, sink)
    finally:
        sink.flush()


def _no_progress(work: int, samples: int, image_bytes: int) -> None:
    """Ray tasks report progress when they finish."""


def _run_on_ray(item: tuple[Task, OutputDir]) -> TaskRecord | OutputError:
    """One task on a Ray worker (module level, so workers import it instead of unpickling).

    An `OutputError` comes back as a value: Ray would wrap a raised one in its own type."""
    task, out = item
    try:
        return _run_one(task, out, _no_progress)
    except OutputError as exc:
        return exc


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


_GLOB_CHARS = "*?["
_SHOWN_PATHS = 3


@dataclass(frozen=True)
class Inputs:
    """The input URLs of a spec, in order, and the glob patterns among its parts."""

    spec: str
    urls: list[str]
    globs: list[str]


def expand_inputs(spec: str) -> Inputs:
    """Expand the brace patterns of `spec`; a local path with `*`, `?` or `[` that does not
    exist as such is a glob, replaced by the files it matches (sorted, so every run and every
    node gets the same list)."""
    urls: list[str] = []
    globs: list[str] = []
    for part in split_spec(spec):
        for url in braceexpand(part):
            if url_kind(url) == "local" and any(c in url for c in _GLOB_CHARS):
                path = local_path(url)
                if not path.exists():
                    globs.append(url)
                    urls += sorted(m for m in glob.glob(str(path)) if Path(m).is_file())
                    continue
            urls.append(url)
    return Inputs(spec, urls, globs)


def check_found(inputs: Inputs, what: str, example: str) -> None:
    """Refuse a conversion whose inputs are all local and none exists (a typo in the path, or a
    glob matching nothing): it would write nothing and succeed. Some missing inputs among
    found ones are warnings (MMC4 has missing shard numbers); remote ones are looked at when
    converted."""
    urls = inputs.urls
    if any(url_kind(u) != "local" for u in urls) or any(local_path(u).is_file() for u in urls):
        return
    fix = (
        f"check the path; a range of numbered files is written in brace syntax ({example}), "
        "a list as {a,b}, and '::' joins specs"
    )
    found: list[str] = []
    if inputs.globs:
        found.append(f"no file matches {', '.join(inputs.globs[:_SHOWN_PATHS])}")
    if urls:
        shown = ", ".join(urls[:_SHOWN_PATHS]) + (", ..." if len(urls) > _SHOWN_PATHS else "")
        found.append(f"none of the {len(urls)} file(s) it names exists (looked for {shown})")
    raise ConvertError(f"no input found: {what} {inputs.spec!r}: {'; '.join(found)}", fix=fix)


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


@dataclass(frozen=True)
class Listing:
    """What the output location holds at the start ({name: bytes}, None for a folder)."""

    top: dict[str, int | None]
    records: dict[str, int | None]

    @classmethod
    def of(cls, out: OutputDir) -> Listing:
        return cls(out.entries(), out.entries(RECORDS_DIR))


def check_output(out: OutputDir, tasks: Sequence[Task], listing: Listing) -> None:
    """Make the output location and probe it, before any work: an output that cannot be
    written (read-only, no permission, a file in its path) or a folder where the run will write
    a file (a shard, a record, manifest.json, sizes.json) raises `OutputError` naming it."""
    fixed = {PLAN_FILE, MANIFEST_FILE, SIZES_FILE}
    patterns = [p for task in tasks for p in task.output_names()]
    for name, size in sorted(listing.top.items()):
        if size is not None or name == RECORDS_DIR:
            continue
        if name in fixed or any(fnmatch.fnmatchcase(name, p) for p in patterns):
            _blocked(out, name)
    records = {f"{task.name}.json" for task in tasks}
    for name, size in sorted(listing.records.items()):
        if size is None and name in records:
            _blocked(out, f"{RECORDS_DIR}/{name}")
    out.make_folder(RECORDS_DIR)
    out.check_writable()


def _blocked(out: OutputDir, name: str) -> None:
    raise OutputError(
        f"{out.join(name)} is a folder (or another non-file): the conversion writes a file of "
        "that name there",
        fix="remove or rename it, or choose another --out folder",
    )


def _write_plan(out: OutputDir, kind: str, tasks: Sequence[Task]) -> None:
    """List every task of the conversion (the same bytes from every node; written when new)."""
    plan = {"kind": kind, "inputs": [{"name": t.name, "input": t.input} for t in tasks]}
    data = json_bytes(plan)
    if out.read_one(PLAN_FILE) != data:
        out.write_bytes(PLAN_FILE, data)


@dataclass(frozen=True)
class RunOptions:
    """How a conversion runs, the same for every converter: worker processes (default: all
    cores), `overwrite` to redo complete tasks, a progress callback, this node's `partition`
    of the tasks, and `ray` to run one Ray task per conversion task instead of processes."""

    workers: int | None = None
    overwrite: bool = False
    on_progress: ProgressCallback | None = None
    partition: Partition = field(default_factory=Partition)
    ray: RayOptions | None = None


class _Progress:
    """The totals of this node's tasks, reported to the callback as work is done."""

    def __init__(
        self,
        tasks: Sequence[Task],
        done: Mapping[str, TaskRecord],
        callback: ProgressCallback | None,
    ) -> None:
        self.state = ProgressState(
            work_total=sum(t.weight for t in tasks),
            tasks_total=len(tasks),
            tasks_done=len(done),
            work_done=sum(t.weight for t in tasks if t.name in done),
        )
        self.callback = callback

    def __call__(self, work: int, samples: int, image_bytes: int) -> None:
        self.state.work_done += work
        self.state.samples += samples
        self.state.image_bytes += image_bytes
        if self.callback is not None:
            self.callback(self.state)

    def task_done(self, record: TaskRecord | None = None, weight: int = 0) -> None:
        """One task finished; with its `record`, count its `weight` and what it wrote."""
        self.state.tasks_done += 1
        if record is None:
            self(0, 0, 0)
        else:
            samples = sum(s.samples for s in record.shards)
            self(weight, samples, record.counts["image_bytes"])


def run_tasks(
    tasks: Sequence[Task],
    out_dir: str | Path | OutputDir,
    *,
    kind: str,
    run: RunOptions | None = None,
    strict_keys: tuple[str, ...] = (),
) -> ConvertReport:
    """Run every task of this node's part not already complete, then write the manifest.

    `tasks` is the whole conversion; `run.partition` picks this node's part (every node must
    get the same `tasks`). A task is complete when its record matches its fingerprint and every
    shard it lists has the recorded size; `run.overwrite` redoes everything. Tasks run in worker
    processes, or with `run.ray` one Ray task each. A node of several leaves `manifest.json` and
    `sizes.json` to `merge_outputs`.
    """
    start = time.monotonic()
    run = run or RunOptions()
    out = open_output(out_dir)
    check_unique_names(tasks)
    listing = Listing.of(out)  # one listing serves the checks and the resume
    check_output(out, tasks, listing)
    _write_plan(out, kind, tasks)
    tasks = run.partition.select(tasks)

    old_records = load_records(out, [t.name for t in tasks])
    if not run.overwrite:  # refuse before touching anything
        _check_same_options(out, tasks, old_records)
    done, pending = _resume(out, tasks, old_records, listing, run.overwrite)
    progress = _Progress(tasks, done, run.on_progress)
    progress(0, 0, 0)
    results = _execute(pending, out, run, progress)
    progress.state.work_done = progress.state.work_total  # weights are estimates: end full
    progress(0, 0, 0)
    if not run.partition.split:
        write_manifest(out, kind)
    return ConvertReport(
        kind,
        out.url,
        [done.get(t.name) or results[t.name] for t in tasks],
        list(done),
        time.monotonic() - start,
        strict_keys,
        run.partition,
        manifest_written=not run.partition.split,
    )


def _check_same_options(
    out: OutputDir, tasks: Sequence[Task], old_records: Mapping[str, TaskRecord]
) -> None:
    """Refuse to resume into shards converted with other options or inputs."""
    for task in tasks:
        old = old_records.get(task.name)
        if old is not None and old.status == "converted" and old.fingerprint != task.fingerprint():
            raise ConvertError(
                f"{out.url} already holds shards of {task.input} converted with other "
                f"options or inputs (record {out.join(_record_name(task.name))})",
                fix="pass --overwrite to redo them, or choose another --out directory",
            )


def _resume(
    out: OutputDir,
    tasks: Sequence[Task],
    old_records: Mapping[str, TaskRecord],
    listing: Listing,
    overwrite: bool,
) -> tuple[dict[str, TaskRecord], list[Task]]:
    """The complete tasks' records, and the tasks to run (what they left behind removed)."""
    sizes = {name: size for name, size in listing.top.items() if size is not None}
    temporaries = [n for n in sizes if n.startswith(".") and TMP_MARKER in n]
    temporaries += [
        f"{RECORDS_DIR}/{n}"
        for n, size in listing.records.items()
        if size is not None and n.startswith(".") and TMP_MARKER in n
    ]
    done: dict[str, TaskRecord] = {}
    pending: list[Task] = []
    for task in tasks:
        old = old_records.get(task.name)
        if old is not None and not overwrite and _complete(sizes, old):
            done[task.name] = old
            continue
        _clean(out, task, old, temporaries)
        pending.append(task)
    return done, pending


def _execute(
    pending: Sequence[Task], out: OutputDir, run: RunOptions, progress: _Progress
) -> dict[str, TaskRecord]:
    """Run the pending tasks on Ray, here (one worker) or in a pool of processes."""
    results: dict[str, TaskRecord] = {}
    n = min(run.workers or default_workers(), len(pending))
    if run.ray is not None and pending:

        def finished(index: int, record: TaskRecord | OutputError) -> None:
            if isinstance(record, OutputError):
                raise record  # ray_map cancels the other tasks
            progress.task_done(record, pending[index].weight)

        records = ray_map(_run_on_ray, [(t, out) for t in pending], run.ray, finished)
        results.update((r.name, r) for r in records if isinstance(r, TaskRecord))
    elif n <= 1:
        for task in pending:
            results[task.name] = _run_one(task, out, progress)
            progress.task_done()
    else:
        results.update(_run_pool(pending, out, n, progress))
    return results


def _run_pool(
    pending: Sequence[Task], out: OutputDir, n: int, progress: _Progress
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
            progress(work, samples, image_bytes)

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
                    progress.state.tasks_done += 1
                progress(0, 0, 0)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    drain()
    progress_queue.close()
    return results


def _all_records(out: OutputDir) -> dict[str, TaskRecord]:
    names = sorted(
        n.removesuffix(".json")
        for n in out.file_sizes(RECORDS_DIR)
        if n.endswith(".json") and not n.startswith(".")
    )
    return load_records(out, names)


def write_manifest(
    out: OutputDir, kind: str, records: Mapping[str, TaskRecord] | None = None
) -> dict[str, object]:
    """Gather every complete record in `out` (any run, any machine) into manifest.json and
    sizes.json; the record files are the per-node pieces."""
    sizes = out.file_sizes()
    found = _all_records(out) if records is None else records
    records_ = [found[n] for n in sorted(found) if _complete(sizes, found[n])]
    shards = {s.name: {"input": r.input, **s.to_dict()} for r in records_ for s in r.shards}
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
            for r in records_
        },
    }
    out.write_json(MANIFEST_FILE, manifest)
    out.write_json(SIZES_FILE, {name: int(s["samples"]) for name, s in sorted(shards.items())})  # type: ignore[call-overload]
    return manifest


def open_error_is_missing(exc: OpenerError) -> bool:
    """Whether an opener error means the file does not exist (as opposed to unreadable)."""
    return isinstance(exc.__cause__, FileNotFoundError)


@dataclass(frozen=True)
class Incomplete:
    """An input of the plan without finished shards, and why."""

    name: str
    input: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "input": self.input, "reason": self.reason}


@dataclass
class MergeReport:
    """What `convert merge` found: the planned inputs, which are done, missing or incomplete."""

    kind: str
    out_dir: str
    planned: int
    complete: int
    missing: list[TaskRecord]
    incomplete: list[Incomplete]
    totals: Counter[str]
    written: bool

    @property
    def ok(self) -> bool:
        return not self.incomplete

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "out_dir": self.out_dir,
            "ok": self.ok,
            "inputs": self.planned,
            "complete": self.complete,
            "missing": [{"name": r.name, "input": r.input} for r in self.missing],
            "incomplete": [i.to_dict() for i in self.incomplete],
            "totals": dict(sorted(self.totals.items())),
            "manifest": join_url(self.out_dir, MANIFEST_FILE) if self.written else None,
            "sizes": join_url(self.out_dir, SIZES_FILE) if self.written else None,
        }


def merge_outputs(
    out_dir: str | Path | OutputDir, *, allow_incomplete: bool = False
) -> MergeReport:
    """Check every input of `plan.json` against the records the nodes wrote, then write
    `manifest.json` and `sizes.json` (only when every input is done, unless `allow_incomplete`).

    Inputs that were not found (MMC4 has missing shard numbers) count as done, with a warning.
    """
    out = open_output(out_dir)
    raw_plan = out.read_one(PLAN_FILE)
    if raw_plan is None:
        raise ConvertError(
            f"{out.join(PLAN_FILE)} does not exist: no conversion has started in {out.url}",
            fix="run `flamingo convert mmc4|laion ... --out` on every node first (a rerun of an "
            "older conversion writes plan.json and keeps its complete shards)",
        )
    try:
        plan = json.loads(raw_plan)
        kind = str(plan["kind"])
        planned = [(str(i["name"]), str(i["input"])) for i in plan["inputs"]]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ConvertError(
            f"{out.join(PLAN_FILE)} is damaged ({exc})",
            fix="rerun the conversion on any node: it rewrites plan.json",
        ) from exc
    records = load_records(out, [name for name, _ in planned])
    sizes = out.file_sizes()
    missing: list[TaskRecord] = []
    incomplete: list[Incomplete] = []
    totals: Counter[str] = Counter()
    complete = 0
    for name, source in planned:
        record = records.get(name)
        if record is None:
            incomplete.append(Incomplete(name, source, "not converted yet (no record)"))
        elif record.status == "missing":
            missing.append(record)
        elif record.status == "failed":
            reason = record.problems[0].message if record.problems else "failed"
            incomplete.append(Incomplete(name, source, f"failed: {reason}"))
        elif not _complete(sizes, record):
            gone = next(s.name for s in record.shards if sizes.get(s.name) != s.bytes)
            incomplete.append(
                Incomplete(name, source, f"shard {gone} is missing or not its recorded size")
            )
        else:
            complete += 1
            totals.update(record.counts)
            totals["shards"] += len(record.shards)
            totals["samples"] += sum(s.samples for s in record.shards)
            totals["shard_bytes"] += sum(s.bytes for s in record.shards)
    written = not incomplete or allow_incomplete
    if written:
        write_manifest(out, kind)
    return MergeReport(kind, out.url, len(planned), complete, missing, incomplete, totals, written)
