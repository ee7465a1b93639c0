"""A run directory belongs to one run at a time: the lock file `<run_dir>/run.lock`.

The process that launches a run takes the lock before it builds anything: `flamingo train`
itself for one process, or when it starts torchrun on one node (the ranks find the lock's
token in `FLAMINGO_RUN_LOCK_TOKEN` and leave it alone); rank 0 when an outside launcher
(srun, torchrun run directly) started the ranks, or across nodes, where the rendezvous decides
which node rank 0 runs on. The holder keeps the lock file open and, from a daemon thread, touches it every
`HEARTBEAT_S` seconds: the file's modification time is the heartbeat (touching the open file
cannot overwrite a lock another run has put in its place, as rewriting the path could). It
removes the lock when it ends, also after an error or a stop signal. A second start finds the
lock and stops with a message naming the holder. A lock is stale, and the next start takes it
over with a message, when the holder's process is gone (same host, boot and pid namespace, so
that its pid names the same process) or its heartbeat is older than `STALE_AFTER_S` (a
requeued job may start on another host, and a killed one leaves its lock behind);
`flamingo train --take-over` takes over a lock its user knows to be stale.

The file holds one JSON object, written whole before it appears (a temporary file, then a hard
link, which fails when a lock exists), and never rewritten:

    {
      "version": 1,
      "host": "node17",                     # socket.gethostname()
      "pid": 41234,
      "pid_start": 918273,                  # /proc/<pid>/stat start time (ticks), or null
      "pid_namespace": "pid:[4026531836]",  # readlink /proc/self/ns/pid, or null
      "boot_id": "6f1c...",                 # /proc/sys/kernel/random/boot_id, or null
      "started": "2025-06-01T12:00:00.123456+00:00",  # ISO 8601, UTC
      "argv": ["flamingo", "train", "recipe.toml"],
      "token": "3f2a..."                    # random: names this holding of the lock
    }

and the heartbeat is the file's mtime. `read_lock(run_dir)` returns both as a `LockHolder`
(None when there is no readable lock), `stale_reason(holder)` says whether it still counts,
and `LockHolder.describe()` words it; `flamingo status` reads the lock through these.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from flamingo_cli.errors import FlamingoError

LOCK_FILE = "run.lock"
LOCK_VERSION = 1
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
TOKEN_ENV = "FLAMINGO_RUN_LOCK_TOKEN"
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


class RunDirLocked(FlamingoError):
    """Another run holds the run directory."""


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the run that holds it."""

    host: str
    pid: int
    pid_start: int | None
    pid_namespace: str | None
    boot_id: str | None
    started: str
    heartbeat: str  # the lock file's mtime, ISO 8601 UTC
    argv: tuple[str, ...]
    token: str
    version: int = LOCK_VERSION

    @classmethod
    def this_process(cls) -> LockHolder:
        now = _now().isoformat()
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=_process_start(os.getpid()),
            pid_namespace=_read_link("/proc/self/ns/pid"),
            boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
            started=now,
            heartbeat=now,
            argv=tuple(sys.argv),
            token=uuid.uuid4().hex,
        )

    def to_json(self) -> str:
        """The lock file's content (the heartbeat is the file's mtime, not in it)."""
        data = asdict(self)
        data["argv"] = list(self.argv)
        del data["heartbeat"]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def describe(self, now: datetime.datetime | None = None) -> str:
        """`pid 41234 on host node17 (since 2025-06-01 12:00:00 UTC, last heartbeat 12 s ago)`."""
        now = now or _now()
        since = _parse_time(self.started).strftime("%Y-%m-%d %H:%M:%S UTC")
        beat = _ago((now - _parse_time(self.heartbeat)).total_seconds())
        return f"pid {self.pid} on host {self.host} (since {since}, last heartbeat {beat})"


def read_lock(run_dir: Path) -> LockHolder | None:
    """The holder of `run_dir`'s lock; None when there is no lock file or it cannot be read."""
    return _read(run_dir / LOCK_FILE)


def stale_reason(holder: LockHolder, now: datetime.datetime | None = None) -> str | None:
    """Why `holder` no longer holds its lock (its process is gone, its heartbeat is old), or
    None while it may still be running."""
    now = now or _now()
    age = (now - _parse_time(holder.heartbeat)).total_seconds()
    if age > STALE_AFTER_S:
        return f"its heartbeat stopped {_ago(age)}"
    if holder.host != socket.gethostname():
        return None  # another machine: only the heartbeat can tell
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    if holder.boot_id and boot and holder.boot_id != boot:
        return f"host {holder.host} has restarted since"
    if holder.pid_namespace != _read_link("/proc/self/ns/pid"):
        return None  # another container on this host: its pids are not ours
    if not _process_alive(holder.pid, holder.pid_start):
        return f"its process {holder.pid} is gone"
    return None


class RunLock:
    """This process's hold on a run directory; `release()` (or leaving the `with`) ends it.

    It keeps the lock file open: the heartbeat touches that open file, never a path, so it
    cannot touch, or overwrite, a lock another run has put in its place; a lock file that is
    no longer the open one means the lock was taken over (`lost`).
    """

    def __init__(self, path: Path, holder: LockHolder, fd: int, took_over: str | None) -> None:
        self.path = path
        self.holder = holder
        self.took_over = took_over  # what stale lock was replaced, for a message
        self.lost = False  # another run took the lock over while this one held it
        self.lost_to: LockHolder | None = None  # that run, when its lock could be read
        self.on_lost: Callable[[], None] | None = None  # called once, from the heartbeat
        self._fd = fd
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.refresh()

    def holds(self) -> bool | None:
        """Whether the lock file is still ours; None when that cannot be told just now."""
        try:
            there = self.path.stat()
        except FileNotFoundError:
            return False
        except OSError:
            return None
        mine = os.fstat(self._fd)
        return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)

    def refresh(self) -> None:
        """Touch the heartbeat; notice a lost lock, put back one removed by hand."""
        if self.lost:
            return
        holds = self.holds()
        if holds is None:
            return  # a passing file-system error: the next beat retries
        if not holds and not self.path.exists():
            with contextlib.suppress(FlamingoError, OSError):  # removed by hand: take it again
                fd = _create(self.path, self.holder)
                if fd is not None:
                    os.close(self._fd)
                    self._fd, holds = fd, True
        if not holds:
            self.lost, self.lost_to = True, _read(self.path)
            if self.on_lost is not None:
                self.on_lost()
            return
        with contextlib.suppress(OSError):  # a passing file-system error: next beat retries
            os.utime(self._fd)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self.holds():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def acquire_run_lock(run_dir: Path, *, take_over: bool = False) -> RunLock:
    """Create `run_dir` if needed and take its lock, replacing a stale one.

    Raises `RunDirLocked` naming the holder when another run has it, and FlamingoError naming
    the path when the directory cannot be created or written (this is the run directory's
    writability check, so it runs before anything expensive).
    """
    prepare_run_dir(run_dir)
    path = run_dir / LOCK_FILE
    mine = LockHolder.this_process()
    took_over: str | None = None
    for _ in range(5):
        fd = _create(path, mine)
        if fd is not None:
            return RunLock(path, mine, fd, took_over)
        current = _read(path)
        if current is None:
            if not path.exists():
                continue  # released between our two looks
            if path.is_dir():  # never ours: it may hold someone's files, so not moved aside
                raise FlamingoError(
                    f"the lock file of the run directory {run_dir} is a directory: {path}",
                    fix=f"remove or rename the directory {path} (flamingo writes a file there)",
                )
            if _age_s(path) < 5:  # maybe being written (file systems without hard links)
                time.sleep(1)
                continue
            took_over = f"replaced the unreadable lock file {path}"
            _move_aside(path, None)
            continue
        reason = stale_reason(current) or ("--take-over was given" if take_over else None)
        if reason is None:
            raise RunDirLocked(
                f"the run directory {run_dir} is in use by another run: {current.describe()}",
                fix=f"wait for that run to end, stop it (kill -TERM {current.pid} on "
                f"{current.host}; it saves a checkpoint first), or give this run another "
                "run.name or run.output_dir; if that run is gone for sure, rerun with "
                "--take-over",
            )
        if _move_aside(path, current):
            took_over = f"took over the lock of {run_dir} from {current.describe()}: {reason}"
    raise RunDirLocked(
        f"could not take the lock of the run directory {run_dir}: other runs keep taking it",
        fix="make sure one run at a time starts on this run directory",
    )


def claim_for_rank(run_dir: Path, *, take_over: bool = False) -> RunLock | None:
    """For the process that coordinates a run (rank 0): take the lock, or, when our own
    launcher holds it (its token in the environment), check that it still does (None)."""
    token = os.environ.get(TOKEN_ENV)
    if not token:
        return acquire_run_lock(run_dir, take_over=take_over)
    current = read_lock(run_dir)
    if current is None or current.token != token:
        held = f"; it is held by {current.describe()}" if current else ""
        raise RunDirLocked(
            f"the launcher of this run no longer holds the lock of {run_dir}{held}",
            fix="make sure one run at a time uses this run directory, then start again",
        )
    return None


def prepare_run_dir(run_dir: Path) -> None:
    """Create `run_dir` and check that files can be written in it, or raise a FlamingoError
    that names the path, what is in the way, and the fix."""
    fix = "set run.output_dir (or --set run.output_dir=DIR) to a writable directory"
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise FlamingoError(
            f"cannot use the run directory {run_dir}: {blocker} is a file, not a directory",
            fix=f"{fix}, or move {blocker} away",
        )
    probe = run_dir / f".write-test.{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise FlamingoError(
            f"cannot write in the run directory {run_dir}: {error.strerror or error}",
            fix=fix,
        ) from error


def _create(path: Path, holder: LockHolder) -> int | None:
    """Create the lock file with its whole content, only if there is none; an open descriptor
    of it, or None when there is one already."""
    tmp = path.with_name(f".{LOCK_FILE}.{holder.token[:12]}.tmp")
    try:
        fd = _write(tmp, holder)
        try:
            os.link(tmp, path)  # atomic and exclusive, also on NFS
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as error:
            os.close(fd)
            if error.errno not in _NO_HARD_LINKS:
                raise
            return _create_without_links(path, holder)
        return fd
    except OSError as error:
        raise FlamingoError(
            f"cannot write the lock file {path}: {error.strerror or error}",
            fix="set run.output_dir (or --set run.output_dir=DIR) to a writable directory",
        ) from error
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _create_without_links(path: Path, holder: LockHolder) -> int | None:
    """For file systems without hard links: exclusive create, then the content."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    os.write(fd, holder.to_json().encode("utf-8"))
    return fd


def _move_aside(path: Path, expected: LockHolder | None) -> bool:
    """Remove a stale lock, only if it is still the one judged stale (False otherwise)."""
    aside = path.with_name(f".{LOCK_FILE}.stale.{uuid.uuid4().hex[:12]}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return False  # another start moved it first
    moved = _read(aside)
    if expected is not None and (moved is None or moved.token != expected.token):
        # a new holder's fresh lock replaced the stale one meanwhile: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def _write(path: Path, holder: LockHolder) -> int:
    """Write the lock's content to `path`; the descriptor stays open (the heartbeat's)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, holder.to_json().encode("utf-8"))
        os.fsync(fd)
    except OSError:
        os.close(fd)
        raise
    return fd


def _read(path: Path) -> LockHolder | None:
    try:
        with path.open("rb") as handle:
            data: Any = json.loads(handle.read())
            beat = os.fstat(handle.fileno()).st_mtime
        return LockHolder(
            host=str(data["host"]),
            pid=int(data["pid"]),
            pid_start=None if data.get("pid_start") is None else int(data["pid_start"]),
            pid_namespace=data.get("pid_namespace"),
            boot_id=data.get("boot_id"),
            started=str(data["started"]),
            heartbeat=datetime.datetime.fromtimestamp(beat, datetime.UTC).isoformat(),
            argv=tuple(str(a) for a in data.get("argv", ())),
            token=str(data["token"]),
            version=int(data.get("version", LOCK_VERSION)),
        )
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _parse_time(text: str) -> datetime.datetime:
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return datetime.datetime.fromtimestamp(0, datetime.UTC)  # unreadable: very old
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _ago(seconds: float) -> str:
    if seconds < 0:
        return "in the future (clocks differ)"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _process_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return start is None or _process_start(pid) in (None, start)  # a reused pid starts later


def _process_start(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (Linux), to tell a reused pid apart."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ')'
    try:
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _read_link(path: str) -> str | None:
    try:
        return str(Path(path).readlink())
    except OSError:
        return None
