"""The training display: plain lines off a terminal (unchanged), the rich live layout on one
(golden text at 80 and 140 columns), the launcher's view of torchrun ranks through their
events file, eval-loss progress, and a real run on a tmux terminal."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from flamingo_cli.monitor.events import EventFollower, EventWriter
from flamingo_cli.monitor.live import RunWatch
from flamingo_cli.ui import console as console_module
from flamingo_cli.ui import train_view
from flamingo_cli.ui.eval_view import EvalDisplay
from flamingo_cli.ui.live_view import render_text
from flamingo_cli.ui.train_view import TrainDisplay

DATA = Path(__file__).parent / "data"


def fixed_rows(first: int = 3, last: int = 10) -> list[tuple[int, dict[str, Any]]]:
    """A fixed run's metrics lines: two datasets, drops, a skipped step, held-out losses."""
    rows = []
    for step in range(first, last + 1):
        m: dict[str, Any] = {
            "loss/laion": 6.0 - 0.05 * step + 0.02 * ((step * 7) % 5 - 2),
            "loss/mmc4": 6.2 - 0.07 * step + (0.03 if step % 3 == 0 else 0.0),
            "lr": 1e-3 * step / 8,
            "grad_norm": 4.0 + step / 4,
            "skipped": int(step == 5),
            "samples_per_s": 180.0 + step,
            "tokens_per_s": 2800.0 + 10 * step,
            "data_wait": 0.06 + 0.01 * (step % 2),
            "dropped/laion/too_short": step // 4,
            "dropped/mmc4/no_images": step // 2,
            "epoch": 0 if step <= 6 else 1,
            "skipped_steps": int(step >= 5),
        }
        if step % 4 == 0:
            m["eval/loss/laion"] = 5.9 - 0.02 * step
            m["eval/loss/mmc4"] = 6.1 - 0.03 * step
        rows.append((step, m))
    return rows


T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC: every render here is at a fixed time


def fixed_watch(last: int = 60, total: int = 80) -> RunWatch:
    """The fixed rows folded as a run would see them: a step every 3 s, a checkpoint at 48."""
    watch = RunWatch(name="tiny-cpu")
    watch.started(total, 2, T0)
    for step, metrics in fixed_rows(3, last):
        watch.add(step, metrics, T0 + 3 * step)
    watch.checkpointed(48, T0 + 150)
    return watch


def mixture_watch() -> RunWatch:
    """Three datasets with their own rates (the mixtures issue's keys), MFU and memory."""
    watch = RunWatch(name="mix-3b")
    watch.started(1000, 0, T0)
    for step, metrics in fixed_rows(1, 40):
        row = dict(metrics)
        row["loss/obelics"] = 4.0 + 0.5 / step
        for name, rate in (("laion", 96.0), ("mmc4", 48.0), ("obelics", 32.5)):
            row[f"samples_per_s/{name}"] = rate + step / 10
            row[f"tokens_per_s/{name}"] = 20 * rate + step
        row.update({"mfu": 0.4125, "tflops_per_gpu": 408.2, "memory/peak_gib": 61.75})
        watch.add(step * 10, row, T0 + 30 * step)
    watch.checkpointed(400, T0 + 1190)
    return watch


def golden(name: str, text: str) -> str:
    """The stored golden `name` (written when FLAMINGO_WRITE_GOLDENS=1, to renew them)."""
    path = DATA / name
    if os.environ.get("FLAMINGO_WRITE_GOLDENS") == "1":
        path.write_text(text, encoding="utf-8")
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("width", [80, 140])
def test_live_layout_matches_its_golden_text(width: int) -> None:
    text = render_text(fixed_watch(), T0 + 190, width)
    assert text == golden(f"live_view_{width}.txt", text)
    assert max(len(line) for line in text.splitlines()) <= width


def test_live_layout_of_a_mixture_with_mfu_and_memory() -> None:
    text = render_text(mixture_watch(), T0 + 1210, 80)
    assert text == golden("live_view_mixture_80.txt", text)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:1].isalpha()}
    ema = 0.0
    for n in range(1, 41):  # the debiased moving average, weight 0.9 on the past
        ema = 0.9 * ema + 0.1 * (4.0 + 0.5 / n)
    assert rows["obelics"][1:3] == ["4.0125", f"{ema / (1 - 0.9**40):.4f}"]
    assert rows["obelics"][-3:] == ["36.5", "690", "0"]  # its own samples/s and tok/s
    assert "mfu 41.2%" in text and "peak memory 61.8 GiB" in text
    assert "checkpoint step 400 (20 s ago)" in text


def play(display: TrainDisplay) -> None:
    """The fixed sequence of events: a resume, a message, eight logged steps, a message."""
    with display:
        display.started(total_steps=10, start_step=2)
        display.message("a warning from the loaders: shard 3 is damaged")
        for step, metrics in fixed_rows():
            display.step(step, metrics)
        display.message("done")


def test_plain_lines_off_a_terminal_are_byte_identical(capsys: pytest.CaptureFixture[str]) -> None:
    """The golden was written by the display of before the live view, with the same ticks."""
    ticks = iter(range(0, 1000, 3))
    display = TrainDisplay(tick=lambda: float(next(ticks)), run_name="tiny-cpu")
    assert not display.live  # pytest's stdout is not a terminal
    play(display)
    out = capsys.readouterr().out
    assert out == (DATA / "train_plain_lines.txt").read_text(encoding="utf-8")


def test_quiet_shows_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_module.settings, "verbosity", -1)
    play(TrainDisplay())
    assert capsys.readouterr().out == ""


def terminal(monkeypatch: pytest.MonkeyPatch, width: int = 100) -> Console:
    """A recording terminal in place of the training display's stdout console."""
    screen = Console(width=width, height=40, force_terminal=True, record=True, file=io.StringIO())
    monkeypatch.setattr(train_view, "console", screen)
    return screen


def test_on_a_terminal_the_layout_runs_and_messages_scroll_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = terminal(monkeypatch)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000004" / "COMPLETE").write_text("")
    display = TrainDisplay(run_name="tiny-cpu", run_dir=run_dir, now=lambda: T0)
    assert display.live
    with display:
        display.started(total_steps=10, start_step=0)
        display.step(3, fixed_rows(3, 3)[0][1])
        (run_dir / "checkpoints" / "step-00000008").mkdir()
        (run_dir / "checkpoints" / "step-00000008" / "COMPLETE").write_text("")
        display.step(8, fixed_rows(8, 8)[0][1])
    text = screen.export_text()
    assert "checkpoint saved at step 4" not in text  # there before the run: a resume's
    assert f"checkpoint saved at step 8: {run_dir / 'checkpoints' / 'step-00000008'}" in text
    assert "held-out loss at step 8: laion 5.7400  mmc4 5.8600" in text
    last = text[text.rindex("tiny-cpu  step") :]  # the final frame stays on the screen
    assert last.startswith("tiny-cpu  step 8/10  epoch 1")
    assert [line.split()[0] for line in last.splitlines()[2:7]] == [
        "dataset",
        "─" * 100,
        "laion",
        "mmc4",
        "all",
    ]
    assert "checkpoint step 8" in last


def test_an_eval_only_row_keeps_the_last_full_rows_figures() -> None:
    watch = fixed_watch(last=10)
    watch.add(11, {"step": 11, "eval/loss/laion": 4.5, "eval/loss/mmc4": 4.25})
    assert watch.step == 11 and watch.held_out_step == 11
    assert watch.last["lr"] == pytest.approx(1e-3 * 10 / 8)  # still step 10's row
    assert watch.datasets["laion"].last == pytest.approx(5.46)
    assert (watch.datasets["laion"].held_out, watch.datasets["mmc4"].held_out) == (4.5, 4.25)
    assert watch.datasets["mmc4"].dropped == 5


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def started(self, total_steps: int, start_step: int) -> None:
        self.events.append(("started", total_steps, start_step))

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        self.events.append(("step", step, metrics))

    def message(self, text: str) -> None:
        self.events.append(("message", text))


def test_rank_zeros_events_replay_in_the_launcher(tmp_path: Path) -> None:
    """What a torchrun rank 0 writes (--events) reaches the launcher's display in order; a line
    still being written waits for its end."""
    path = tmp_path / "events.jsonl"
    recorder = Recorder()
    follower = EventFollower(path, recorder, interval=0.01)
    follower.poll()  # no file yet: nothing
    with EventWriter(path) as writer:
        writer.started(10, 2)
        writer.message("resuming")
        writer.step(3, fixed_rows(3, 3)[0][1])
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"event": "message", "text": "half')
    follower.poll()
    assert [e[0] for e in recorder.events] == ["started", "message", "step"]
    assert recorder.events[2] == ("step", 3, fixed_rows(3, 3)[0][1])
    with path.open("a", encoding="utf-8") as handle:
        handle.write(' written"}\nnot json\n')
    follower.start()
    follower.stop()
    assert recorder.events[-1] == ("message", "half written")
    assert len(recorder.events) == 4


def test_eval_loss_bar_shows_batches_samples_and_running_loss() -> None:
    screen = Console(width=120, force_terminal=True, record=True, file=io.StringIO())
    with EvalDisplay(console=screen) as display:
        assert display.live
        display.dataset_started("mmc4", 10)
        display.batch_done("mmc4", 3, 12, 2.5)
        assert display._progress is not None
        display._progress.refresh()
    text = screen.export_text()
    assert "eval mmc4" in text
    assert "3/10 batches  12 samples  loss 2.5000" in text


TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny-cpu.toml"
DONE = "FLAMINGO-TEST-EXIT="


def on_tmux(args: list[str], timeout: float = 240) -> str:
    """Run `flamingo ARGS` on a 100 x 40 tmux terminal; the screen once it has exited."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (CI installs it)")
    server = f"flamingo-test-{os.getpid()}-{time.monotonic_ns()}"  # our own tmux server
    command = shlex.join([sys.executable, "-m", "flamingo_cli", *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("NO_COLOR", None)
    env.pop("TMUX", None)
    tmux = ["tmux", "-L", server, "-f", "/dev/null"]
    subprocess.run(
        [
            *tmux,
            "new-session",
            "-d",
            "-x",
            "100",
            "-y",
            "40",
            f"{command}; echo {DONE}$?; sleep 600",
        ],
        env=env,
        check=True,
        cwd=TINY.parent.parent,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p"], capture_output=True, text=True, check=True
            ).stdout
            if DONE in screen or time.monotonic() > deadline:
                return screen
            time.sleep(0.5)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, capture_output=True)


def dataset_rows(screen: str) -> dict[str, list[str]]:
    return {
        line.split()[0]: line.split()
        for line in screen.splitlines()
        if line.split() and line.split()[0] in ("laion", "mmc4", "all")
    }


@pytest.mark.slow
def test_a_real_run_on_a_terminal_shows_the_live_view(tmp_path: Path) -> None:
    screen = on_tmux(["train", str(TINY), "--set", f"run.output_dir={tmp_path}"])
    assert f"{DONE}0" in screen, screen
    assert "tiny-cpu  step 16/16  epoch 1" in screen, screen
    rows = dataset_rows(screen)
    assert set(rows) == {"laion", "mmc4", "all"}, screen
    assert all(float(rows[name][1]) > 0 for name in ("laion", "mmc4"))
    assert f"checkpoint saved at step 16: {tmp_path}" in screen.replace("\n", "")
    assert "step 1/16  laion" not in screen  # no plain lines on a terminal


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_ranks_show_the_same_live_view_in_the_launcher(tmp_path: Path) -> None:
    args = ["train", str(TINY), "--nproc-per-node", "2", "--set", "distributed.strategy=ddp"]
    args += ["--set", f"run.output_dir={tmp_path}", "--set", "run.num_epochs=1"]
    args += ["--set", "data.laion.train_num_samples=32", "--set", "data.mmc4.train_num_samples=16"]
    screen = on_tmux(args)
    assert f"{DONE}0" in screen, screen
    assert "tiny-cpu  step 2/2  epoch 0" in screen, screen
    assert set(dataset_rows(screen)) == {"laion", "mmc4", "all"}, screen
