"""`flamingo status`: finished, stopped, running and stale-locked runs, a metrics file still being
written, an empty directory, a recipe instead of a run directory, --json and --follow; the
tolerant metrics tail underneath."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.monitor.metrics_file import MetricsTail
from flamingo_cli.monitor.status import FINISHED, METRICS_FILE, RunStatus, read_status
from flamingo_cli.runtime.run_lock import LOCK_FILE, LockHolder, acquire_run_lock
from flamingo_cli.ui.status_view import chart_lines, status_text

from .conftest import RECIPES, cli_in_fresh_interpreter
from .test_live_view import DATA, T0, fixed_rows, golden

TINY = RECIPES / "tiny-cpu.toml"  # 16 steps: the total the kept recipe gives
runner = CliRunner()


def fake_run(
    root: Path, *, last: int = 16, checkpoints: tuple[int, ...] = (8, 16), finished: bool = True
) -> Path:
    """A run directory as training leaves it: metrics rows 1..last (held-out every 4 steps),
    complete checkpoints (a data file of 1,000 bytes per step, the recipe, COMPLETE at a fixed
    time) and FINISHED."""
    run_dir = root / "tiny-cpu"
    run_dir.mkdir(parents=True)
    with (run_dir / METRICS_FILE).open("w", encoding="utf-8") as handle:
        for step, metrics in fixed_rows(1, last):
            handle.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
    for step in checkpoints:
        path = run_dir / "checkpoints" / f"step-{step:08d}"
        path.mkdir(parents=True)
        (path / "__0_0.distcp").write_bytes(b"\0" * 1000 * step)
        (path / "recipe.toml").write_text(TINY.read_text(encoding="utf-8"), encoding="utf-8")
        (path / "COMPLETE").write_text("")
        os.utime(path / "COMPLETE", (T0 + 3 * step, T0 + 3 * step))
    if finished:
        (run_dir / FINISHED).write_text(f"{last}\n", encoding="utf-8")
    return run_dir


def status_json(target: Path, *extra: str) -> dict[str, Any]:
    result = runner.invoke(app, ["status", str(target), "--json", *extra])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_a_finished_run(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path)
    text = status_text(read_status(run_dir, T0 + 100), 80).replace(str(run_dir), "RUN")
    assert text == golden("status_finished_80.txt", text)
    assert max(len(line) for line in text.splitlines()) <= 80
    result = runner.invoke(app, ["status", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"{run_dir}\nfinished at step 16\n" in result.output
    assert "step 16/16 (100%)  epoch 1" in result.output


def test_json_has_the_same_as_data(tmp_path: Path) -> None:
    data = status_json(fake_run(tmp_path))
    assert (data["state"], data["step"], data["total_steps"], data["epoch"]) == (
        "finished",
        16,
        16,
        1,
    )
    assert data["eta_s"] is None
    assert [(c["step"], c["bytes"]) for c in data["checkpoints"]] == [
        (8, 8000 + TINY.stat().st_size),
        (16, 16000 + TINY.stat().st_size),
    ]
    assert data["checkpoints"][0]["saved_at"] == "2026-01-01T00:00:24+00:00"
    assert [row["step"] for row in data["held_out"]] == [4, 8, 12, 16]
    assert data["held_out"][1]["loss"] == {
        "laion": pytest.approx(5.74),
        "mmc4": pytest.approx(5.86),
    }
    assert [p[0] for p in data["loss"]["mmc4"]] == list(range(1, 17))
    assert data["datasets"]["laion"]["dropped"] == 4  # dropped/laion/too_short at step 16
    assert data["datasets"]["mmc4"]["held_out_loss"] == pytest.approx(5.62)
    assert data["last_metrics"]["lr"] == pytest.approx(2e-3)
    assert (data["ignored_lines"], data["partial_last_line"]) == (0, False)


def test_a_stopped_run(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path, last=10, checkpoints=(4, 8), finished=False)
    result = runner.invoke(app, ["status", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "stopped at step 10; a rerun resumes from the checkpoint of step 8" in result.output
    assert "step 10/16 (62%)  epoch 1" in result.output
    assert status_json(run_dir)["state"] == "stopped"


def _gone_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def test_a_killed_run_whose_lock_remains_is_stopped(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path, last=10, checkpoints=(8,), finished=False)
    holder = LockHolder.this_process()
    pid = _gone_pid()
    dead = LockHolder(**{**holder.__dict__, "pid": pid, "pid_start": None})
    (run_dir / LOCK_FILE).write_text(dead.to_json(), encoding="utf-8")
    data = status_json(run_dir)
    assert data["state"] == "stopped"
    assert data["detail"].endswith(f"(its lock is stale: its process {pid} is gone)")


def test_a_running_run_with_its_eta(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path, last=10, checkpoints=(8,), finished=False)
    with acquire_run_lock(run_dir):
        data = status_json(run_dir)
        result = runner.invoke(app, ["status", str(run_dir)])
    assert data["state"] == "running"
    assert data["detail"].startswith(f"running: pid {os.getpid()} on host ")
    # 8 + 4 samples per step at the median 185.5 samples/s of steps 1..10, 6 steps left
    assert data["eta_s"] == pytest.approx(12 / 185.5 * 6)
    assert "eta 0:00:00 (at the logged samples/s)" in result.output


def test_a_half_written_last_line_is_ignored(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path, last=10, checkpoints=(8,), finished=False)
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
        handle.write('{"step": 11, "loss/laion": 5.4')
    data = status_json(run_dir)
    assert (data["step"], data["partial_last_line"], data["ignored_lines"]) == (10, True, 0)
    result = runner.invoke(app, ["status", str(run_dir)])
    assert result.exit_code == 0
    assert "the last line of metrics.jsonl is still being written" in result.output


def test_a_damaged_middle_line_is_skipped_and_counted(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path, last=4, checkpoints=(), finished=False)
    lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    lines.insert(2, '{"step": 3, "loss/la')  # a run killed mid-write, then resumed
    (run_dir / METRICS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = status_json(run_dir)
    assert (data["step"], data["ignored_lines"]) == (4, 1)
    assert (
        data["detail"]
        == "stopped at step 4; no complete checkpoint: a rerun starts from the beginning"
    )


def test_an_empty_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 1
    assert f"error: {tmp_path} holds no flamingo run: no metrics.jsonl" in result.output
    assert "fix: give the run directory (run.output_dir/run.name" in result.output
    assert "Traceback" not in result.output
    as_json = runner.invoke(app, ["status", str(tmp_path), "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["ok"] is False


def test_a_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert f"error: {tmp_path / 'nope'} does not exist" in result.output


def test_a_recipe_names_its_run_directory(
    tmp_path: Path, write_recipe: Callable[[str], Path]
) -> None:
    text = TINY.read_text(encoding="utf-8").replace(
        'output_dir = "runs"', f'output_dir = "{tmp_path}"'
    )
    recipe = write_recipe(text.replace("tiny-data/", f"{RECIPES}/tiny-data/"))
    fake_run(tmp_path, last=6, checkpoints=(), finished=False)
    data = status_json(recipe)
    assert (data["step"], data["total_steps"], data["recipe"]) == (6, 16, str(recipe))
    unstarted = write_recipe(text.replace('name = "tiny-cpu"', 'name = "other"'), "other.toml")
    result = runner.invoke(app, ["status", str(unstarted)])
    assert result.exit_code == 1
    assert "does not exist: the run has not started" in result.output


def test_follow_refreshes_until_the_run_ends(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path, last=10, checkpoints=(8,), finished=False)
    lock = acquire_run_lock(run_dir)

    def finish() -> None:
        time.sleep(0.6)
        with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": 11, **fixed_rows(11, 11)[0][1]}) + "\n")
        time.sleep(0.6)
        lock.release()

    thread = threading.Thread(target=finish)
    thread.start()
    result = runner.invoke(app, ["status", str(run_dir), "--follow", "--json", "--interval", "0.1"])
    thread.join()
    assert result.exit_code == 0, result.output
    states = [(row["state"], row["step"]) for row in map(json.loads, result.stdout.splitlines())]
    assert states == [("running", 10), ("running", 11), ("stopped", 11)]


def test_the_metrics_tail_reads_complete_lines_and_restarts_on_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    tail = MetricsTail(path)
    assert tail.read() == []
    path.write_text('{"step": 1}\n{"step": 2', encoding="utf-8")
    assert tail.read() == [{"step": 1}]
    with path.open("a", encoding="utf-8") as handle:
        handle.write(', "x": 1}\n')
    assert tail.read() == [{"step": 2, "x": 1}]
    replaced = tmp_path / "new"
    replaced.write_text('{"step": 1}\n', encoding="utf-8")
    replaced.replace(path)  # a resume moved rows aside: the file is a new one
    assert tail.read() == [{"step": 1}]
    assert tail.read_so_far.rows == [{"step": 1}]


def test_the_chart_spans_its_size_with_held_out_marks() -> None:
    train = [(s, 6.0 - s / 10) for s in range(1, 21)]
    lines = chart_lines(train, [(10, 5.2), (20, 4.1)], width=40, height=5)
    assert len(lines) == 6 and all(len(line) == 40 for line in lines[:-1])
    assert lines[0].startswith("  5.900 ") and lines[4].startswith("  4.000 ")
    assert lines[4].endswith("●") and lines[-1].endswith("step 20")
    assert chart_lines([], [], 40, 5) == []


def test_the_goldens_are_there() -> None:
    assert (DATA / "status_finished_80.txt").is_file()


def test_the_charts_are_sized_to_the_terminal(tmp_path: Path) -> None:
    status = read_status(fake_run(tmp_path), T0 + 100)
    heights = {}
    for rows in (40, 60):
        lines = status_text(status, 100, rows).splitlines()
        assert len(lines) <= rows
        heights[rows] = len(lines)
    assert heights[60] > heights[40] > 30


def test_status_does_not_import_torch(tmp_path: Path) -> None:
    """It runs on login nodes and laptops holding a copied run directory: no torch needed."""
    output, loaded = cli_in_fresh_interpreter(["status", str(fake_run(tmp_path)), "--json"])
    assert json.loads(output)["state"] == "finished"
    assert "torch" not in loaded


def test_an_unreadable_metrics_file_is_named(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / METRICS_FILE).mkdir(parents=True)  # a directory where the file goes
    result = runner.invoke(app, ["status", str(run_dir)])
    assert result.exit_code == 1
    assert f"error: cannot read {run_dir / METRICS_FILE}: Is a directory" in result.output


def test_follow_on_a_terminal_redraws_until_the_run_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from flamingo_cli.ui import console as console_module
    from flamingo_cli.ui.status_view import follow_live

    screen = Console(width=100, height=60, force_terminal=True, record=True, file=io.StringIO())
    monkeypatch.setattr(console_module, "console", screen, raising=False)
    run_dir = fake_run(tmp_path, last=10, checkpoints=(8,), finished=False)
    lock = acquire_run_lock(run_dir)
    first = read_status(run_dir, T0)
    assert first.state == "running"
    reads = []

    def read() -> RunStatus:
        lock.release()
        reads.append(read_status(run_dir, T0 + len(reads)))
        return reads[-1]

    follow_live(read, first, 0.01)
    text = screen.export_text()
    assert "running: pid" in text and "stopped at step 10" in text
    assert len(reads) == 1
