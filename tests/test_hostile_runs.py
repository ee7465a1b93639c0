"""A training run never loses work and owns its run directory (issue 15: items 3 and 4, the
metrics.jsonl rows of resumed runs, a run.output_dir that cannot be written).

- a stop signal sent to the whole process group (systemd, `kill -- -PGID`, Ctrl-C) used to
  kill the DataLoader workers first: exit 1 and no checkpoint. Now: checkpoint, exit 0, resume;
- two runs on one run directory used to interleave their metrics and checkpoints. Now the
  second stops, naming the first; stale locks are taken over; `--take-over`;
- a resumed run appended its redone steps to metrics.jsonl a second time;
- an unwritable run.output_dir was a traceback.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.errors import FlamingoError
from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.runtime import run_lock
from flamingo_cli.runtime.launch import _children
from flamingo_cli.runtime.run_dir import list_checkpoints
from flamingo_cli.runtime.run_lock import (
    LOCK_FILE,
    LockHolder,
    RunDirLocked,
    acquire_run_lock,
    read_lock,
)
from flamingo_cli.train.metrics import set_aside_rows_after
from flamingo_cli.train.run import train_rank

from .test_train import TINY, env, flamingo, metrics, train_args

runner = CliRunner()


class Messages:
    """TrainEvents that keep the messages."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def started(self, total_steps: int, start_step: int) -> None:
        return None

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        return None

    def message(self, text: str) -> None:
        self.messages.append(text)


def steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in metrics(run_dir)]


def start_training(out: Path, *extra: str) -> subprocess.Popen[str]:
    """`flamingo train` on the tiny recipe (one loader worker per dataset), for long enough
    to be stopped, in its own session: its process group is it and its loader workers."""
    args = train_args(out, "--set", "run.num_epochs=100", *extra)
    return subprocess.Popen(
        [sys.executable, "-m", "flamingo_cli", *args],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_steps(proc: subprocess.Popen[str], run_dir: Path, count: int) -> None:
    log = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not log.exists() or len(log.read_text().splitlines()) < count:
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, "no training step within 180 s"
        time.sleep(0.1)


def foreign_lock(run_dir: Path, *, host: str, pid: int, heartbeat_age_s: float) -> LockHolder:
    """Put the lock of another run in place (a new file, as a run taking it over does)."""
    mine = LockHolder.this_process()
    beat = time.time() - heartbeat_age_s
    holder = LockHolder(
        host=host,
        pid=pid,
        pid_start=None,
        pid_namespace=mine.pid_namespace,
        boot_id=mine.boot_id,
        started=datetime.datetime.fromtimestamp(beat - 3600, datetime.UTC).isoformat(),
        heartbeat=datetime.datetime.fromtimestamp(beat, datetime.UTC).isoformat(),
        argv=("flamingo", "train", "other.toml"),
        token=uuid.uuid4().hex,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "lock.tmp"
    tmp.write_text(holder.to_json(), encoding="utf-8")
    os.utime(tmp, (beat, beat))
    tmp.replace(run_dir / LOCK_FILE)
    return holder


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- stop signals to the whole process group ------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_exits_zero_and_resumes(tmp_path: Path) -> None:
    """Also: a second `flamingo train` on the running run's directory is refused, naming it."""
    run = tmp_path / "tiny-cpu"
    first = start_training(tmp_path)
    wait_for_steps(first, run, 1)
    second = flamingo(*train_args(tmp_path, "--max-steps", "1"))
    assert second.returncode == 1, second.stderr
    message = " ".join(second.stderr.split())
    host = socket.gethostname()
    assert f"error: the run directory {run} is in use by another run: pid {first.pid} on " in (
        message
    )
    assert f"on host {host} (since " in message and "last heartbeat " in message
    assert "--take-over" in message and "Traceback" not in message

    os.killpg(first.pid, signal.SIGTERM)  # the trainer and its DataLoader workers
    _, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr
    assert "Traceback" not in stderr
    stopped = steps(run)
    assert stopped == list(range(1, len(stopped) + 1))  # the refused start wrote no row
    assert list_checkpoints(run)[-1].step == stopped[-1]  # saved at the stop
    assert not (run / LOCK_FILE).exists()

    more = ("--set", "run.num_epochs=100", "--max-steps", str(stopped[-1] + 2))
    resumed = flamingo(*train_args(tmp_path, *more))
    assert resumed.returncode == 0, resumed.stderr
    assert steps(run) == list(range(1, stopped[-1] + 3))
    assert list_checkpoints(run)[-1].step == stopped[-1] + 2


@pytest.mark.slow
def test_ctrl_c_to_the_group_saves_once_and_a_second_aborts(tmp_path: Path) -> None:
    once = start_training(tmp_path / "once")
    wait_for_steps(once, tmp_path / "once" / "tiny-cpu", 1)
    os.killpg(once.pid, signal.SIGINT)
    stdout, stderr = once.communicate(timeout=180)
    assert once.returncode == 0, stderr
    flat = " ".join(stdout.split())
    assert "SIGINT: saving a checkpoint at the end of this step, then stopping; Ctrl-C again " in (
        flat
    )
    last = steps(tmp_path / "once" / "tiny-cpu")[-1]
    assert list_checkpoints(tmp_path / "once" / "tiny-cpu")[-1].step == last
    assert f"stopped at step {last}/800; checkpoint: " in " ".join(stderr.split())

    twice = start_training(tmp_path / "twice")
    wait_for_steps(twice, tmp_path / "twice" / "tiny-cpu", 1)
    os.killpg(twice.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(twice.pid, signal.SIGINT)
    _, stderr = twice.communicate(timeout=180)
    assert twice.returncode == 130, stderr
    flat = " ".join(stderr.split())
    assert "aborted by a second Ctrl-C, without saving; a rerun resumes from the start" in flat
    assert "Traceback" not in stderr
    assert list_checkpoints(tmp_path / "twice" / "tiny-cpu") == []
    assert not (tmp_path / "twice" / "tiny-cpu" / LOCK_FILE).exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_torchrun_launcher_holds_the_lock_and_a_second_ctrl_c_aborts(tmp_path: Path) -> None:
    run = tmp_path / "tiny-cpu"
    two_ranks = ("--set", "distributed.strategy=ddp", "--nproc-per-node", "2")
    launcher = start_training(tmp_path, *two_ranks)
    wait_for_steps(launcher, run, 1)
    holder = read_lock(run)
    assert holder is not None and holder.pid == launcher.pid  # the launcher, not a rank
    torchrun = _children(launcher.pid)
    started = [*torchrun, *(rank for pid in torchrun for rank in _children(pid))]
    assert len(started) == 3, started  # torchrun and two ranks
    os.killpg(launcher.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGINT)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, stderr
    assert "aborted by a second Ctrl-C, without saving" in " ".join(stderr.split())
    assert not (run / LOCK_FILE).exists()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)  # killed: gone once reaped
    assert [pid for pid in started if _alive(pid)] == []


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- the run directory's lock ---------------------------------------------------------------


def test_a_held_lock_refuses_a_second_holder_and_names_it(tmp_path: Path) -> None:
    with acquire_run_lock(tmp_path) as lock:
        held = read_lock(tmp_path)
        assert held is not None and held.token == lock.holder.token
        assert (lock.holder.host, lock.holder.pid) == (socket.gethostname(), os.getpid())
        with pytest.raises(RunDirLocked) as refused:
            acquire_run_lock(tmp_path)
        assert refused.value.message.startswith(
            f"the run directory {tmp_path} is in use by another run: pid {os.getpid()} on host "
            f"{socket.gethostname()} (since "
        )
        assert "last heartbeat 0 s ago" in refused.value.message
        assert refused.value.fix is not None and "--take-over" in refused.value.fix
    assert read_lock(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path: Path) -> None:
    gone = dead_pid()
    foreign_lock(tmp_path / "a", host=socket.gethostname(), pid=gone, heartbeat_age_s=5)
    with acquire_run_lock(tmp_path / "a") as lock:
        assert lock.took_over is not None
        assert lock.took_over.startswith(f"took over the lock of {tmp_path / 'a'} from pid {gone}")
        assert lock.took_over.endswith(f": its process {gone} is gone")
        assert getattr(read_lock(tmp_path / "a"), "token", None) == lock.holder.token
    # a requeued job on another host: only the heartbeat tells
    foreign_lock(tmp_path / "b", host="node-elsewhere", pid=1, heartbeat_age_s=3600)
    with acquire_run_lock(tmp_path / "b") as lock:
        assert lock.took_over is not None
        assert "from pid 1 on host node-elsewhere" in lock.took_over
        assert lock.took_over.endswith(": its heartbeat stopped 60 min ago")
    # alive as far as we can tell: another host, a fresh heartbeat
    foreign_lock(tmp_path / "c", host="node-elsewhere", pid=1, heartbeat_age_s=20)
    with pytest.raises(RunDirLocked, match=r"pid 1 on host node-elsewhere .*last heartbeat 20 s"):
        acquire_run_lock(tmp_path / "c")
    with acquire_run_lock(tmp_path / "c", take_over=True) as lock:
        assert lock.took_over is not None and lock.took_over.endswith(": --take-over was given")


def test_a_reused_pid_does_not_keep_a_lock(tmp_path: Path) -> None:
    """The pid of a dead holder now names another process (here: this one)."""
    holder = foreign_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), heartbeat_age_s=5)
    start = LockHolder.this_process().pid_start
    if start is None:
        pytest.skip("no /proc here")
    reused = json.loads(holder.to_json()) | {"pid_start": start - 1}
    (tmp_path / LOCK_FILE).write_text(json.dumps(reused), encoding="utf-8")
    with acquire_run_lock(tmp_path) as lock:
        assert lock.took_over is not None and lock.took_over.endswith("is gone")


def test_train_takes_over_a_stale_lock_and_releases_at_exit(tmp_path: Path) -> None:
    run = tmp_path / "tiny-cpu"
    gone = dead_pid()
    foreign_lock(run, host=socket.gethostname(), pid=gone, heartbeat_age_s=1)
    events = Messages()
    loaded = load_recipe(TINY, [parse_override(f"run.output_dir={tmp_path}")])
    assert train_rank(loaded, events, max_steps=1).step == 1
    assert events.messages[0].startswith(f"took over the lock of {run} from pid {gone} on host ")
    assert not (run / LOCK_FILE).exists()


def test_the_lock_is_released_after_a_user_error(tmp_path: Path) -> None:
    overrides = [
        parse_override(f"run.output_dir={tmp_path}"),
        parse_override(f"run.resume={tmp_path / 'no-such-checkpoint'}"),
    ]
    with pytest.raises(FlamingoError, match="not a complete checkpoint"):
        train_rank(load_recipe(TINY, overrides))
    assert (tmp_path / "tiny-cpu").is_dir()
    assert not (tmp_path / "tiny-cpu" / LOCK_FILE).exists()


def test_take_over_option_takes_a_live_lock(tmp_path: Path) -> None:
    run = tmp_path / "tiny-cpu"
    held = acquire_run_lock(run)  # looks alive: this process, a fresh heartbeat
    try:
        args = train_args(tmp_path, "--max-steps", "1")
        refused = runner.invoke(app, args)
        assert refused.exit_code == 1, refused.output
        assert f"is in use by another run: pid {os.getpid()} on host" in refused.stderr
        taken = runner.invoke(app, [*args, "--take-over"])
        assert taken.exit_code == 0, taken.output
        flat = " ".join(taken.output.split())  # the training display's messages, on stdout
        assert f"took over the lock of {run} from pid {os.getpid()}" in flat
        assert flat.count(": --take-over was given") == 1
        assert steps(run) == [1]
    finally:
        held.release()  # the lock is no longer this one's: nothing to remove
    assert not (run / LOCK_FILE).exists()


def test_a_holder_notices_its_lock_taken_over_and_leaves_the_new_one(tmp_path: Path) -> None:
    first = acquire_run_lock(tmp_path)
    before = (tmp_path / LOCK_FILE).stat().st_mtime_ns
    time.sleep(0.01)
    first.refresh()
    assert (tmp_path / LOCK_FILE).stat().st_mtime_ns > before  # the heartbeat
    with acquire_run_lock(tmp_path, take_over=True) as second:
        first.refresh()
        assert first.lost and first.lost_to == read_lock(tmp_path)
        assert first.lost_to is not None and first.lost_to.token == second.holder.token
        first.release()
        assert read_lock(tmp_path) is not None
    assert read_lock(tmp_path) is None


def test_a_run_whose_lock_is_taken_over_stops_without_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.02)
    run = tmp_path / "tiny-cpu"
    intruder: list[LockHolder] = []

    class TakenOverAtStep2(Messages):
        def step(self, step: int, metrics: dict[str, Any]) -> None:
            if step == 2:  # another run takes the directory (--take-over) and holds it
                intruder.append(foreign_lock(run, host="node-b", pid=7, heartbeat_age_s=0))
                time.sleep(0.5)  # a few heartbeats of ours

    loaded = load_recipe(TINY, [parse_override(f"run.output_dir={tmp_path}")])
    with pytest.raises(RunDirLocked) as stopped:
        train_rank(loaded, TakenOverAtStep2(), max_steps=5)
    assert stopped.value.message.startswith(
        f"pid 7 on host node-b (since {intruder[0].started[:10]}"
    )
    assert f"took over the run directory {run} while this run was training" in (
        stopped.value.message
    )
    assert steps(run) == [1, 2]
    assert list_checkpoints(run) == []  # nothing saved over the other run's directory
    assert getattr(read_lock(run), "token", None) == intruder[0].token  # its lock left alone


# --- metrics.jsonl of resumed runs ------------------------------------------------------------


def test_rows_after_the_resumed_step_are_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss/laion": 1.0 / s}) for s in range(1, 11)]
    path.write_text("\n".join(rows) + '\n{"step": 11, "loss/la', encoding="utf-8")
    moved = set_aside_rows_after(path, 8)
    assert moved is not None and (moved.rows, moved.path.name) == (3, "metrics.jsonl.replaced-1")
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, 9))
    assert moved.path.read_text().splitlines() == [rows[8], rows[9], '{"step": 11, "loss/la']
    assert set_aside_rows_after(path, 8) is None  # nothing more to move: the file is untouched
    again = set_aside_rows_after(path, 5)
    assert again is not None and (again.rows, again.path.name) == (3, "metrics.jsonl.replaced-2")
    assert set_aside_rows_after(tmp_path / "missing.jsonl", 0) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.jsonl",
        "metrics.jsonl.replaced-1",
        "metrics.jsonl.replaced-2",
    ]


def test_a_resumed_run_logs_each_step_once(tmp_path: Path) -> None:
    run = tmp_path / "tiny-cpu"
    loaded = load_recipe(TINY, [parse_override(f"run.output_dir={tmp_path}")])
    assert train_rank(loaded, max_steps=3).step == 3
    # what a run killed after logging steps 4 and 5 (checkpoint at 3) leaves, mid-write
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as log:
        log.write('{"step": 4}\n{"step": 5}\n{"step": 6, "lo')
    events = Messages()
    assert train_rank(loaded, events, max_steps=5).step == 5
    assert steps(run) == [1, 2, 3, 4, 5]
    assert (run / "metrics.jsonl.replaced-1").read_text().splitlines() == [
        '{"step": 4}',
        '{"step": 5}',
        '{"step": 6, "lo',
    ]
    assert (
        "moved 3 row(s) of metrics.jsonl after step 3 to metrics.jsonl.replaced-1: this run "
        "logs those steps again" in events.messages
    )


# --- a run directory that cannot be written ---------------------------------------------------


def _fails_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the run directory was checked")

    monkeypatch.setattr("flamingo_cli.train.run.build_model", no_model)


@pytest.mark.parametrize("where", ["afile/sub", "afile"])
def test_a_file_in_the_way_of_the_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    _fails_before_building(monkeypatch)
    (tmp_path / "afile").write_text("not a directory")
    out = tmp_path / where
    result = runner.invoke(app, train_args(out))
    assert result.exit_code == 1, result.output
    flat = " ".join(result.stderr.split())
    assert (
        f"error: cannot use the run directory {out / 'tiny-cpu'}: {tmp_path / 'afile'} is a "
        "file, not a directory" in flat
    )
    assert "fix: set run.output_dir (or --set run.output_dir=DIR) to a writable directory" in flat
    assert "Traceback" not in result.output


def test_a_read_only_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fails_before_building(monkeypatch)
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: fail like a read-only mount
        write_bytes = Path.write_bytes

        def read_only(self: Path, data: bytes) -> int:
            if self.is_relative_to(out):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return write_bytes(self, data)

        monkeypatch.setattr(Path, "write_bytes", read_only)
        (out / "tiny-cpu").mkdir()
        reason = os.strerror(errno.EROFS)
    else:
        out.chmod(0o555)
        reason = os.strerror(errno.EACCES)
    try:
        result = runner.invoke(app, train_args(out))
    finally:
        out.chmod(0o755)
    assert result.exit_code == 1, result.output
    flat = " ".join(result.stderr.split())
    assert f"error: cannot write in the run directory {out / 'tiny-cpu'}: {reason}" in flat
    assert "fix: set run.output_dir" in flat and "Traceback" not in result.output


def test_a_second_ctrl_c_while_saving_aborts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCP wraps a KeyboardInterrupt raised while it plans a save in a CheckpointException;
    the save raises it again as the KeyboardInterrupt that `flamingo train` turns into exit
    130 (it was exit 1 with DCP's traceback when the second Ctrl-C landed in the save)."""
    import torch
    from torch import nn
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from flamingo_cli.runtime.distributed import DistInfo
    from flamingo_cli.train.checkpoint import TrainState, save_checkpoint

    def interrupted(self: DefaultSavePlanner) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(DefaultSavePlanner, "create_local_plan", interrupted)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = TrainState(model, optimizer, schedule, keep=lambda k: True, progress={"step": 1})
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, state, {}, info, recipe_text="", keep_last=0)
    assert list_checkpoints(tmp_path) == []
