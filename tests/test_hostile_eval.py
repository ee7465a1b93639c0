"""Hostile input to `flamingo status`, `flamingo generate` and `flamingo eval-fewshot`: each
case ends with a message naming the file, key or sample and a fix (exit 1 or 2), or with a
result that skips and counts, never with a traceback, a hang or unbounded memory."""

from __future__ import annotations

import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.monitor.metrics_file import MAX_LINE, MetricsTail, read_metrics
from flamingo_cli.monitor.status import METRICS_FILE
from flamingo_cli.runtime.run_lock import acquire_run_lock

from .test_status import fake_run

runner = CliRunner()


def _no_traceback(result: Any) -> str:
    """The output of a run that ended by itself (no exception escaped the command)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def _strict(text: str) -> Any:
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} in --json output")

    return json.loads(text, parse_constant=refuse)


# --- status ---------------------------------------------------------------------------------


def test_status_of_a_sparse_2_gib_metrics_file_reads_in_bounded_memory(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path)
    with (run_dir / METRICS_FILE).open("ab") as handle:
        handle.truncate(2 * 1024**3)  # a hole: 2 GiB of NUL bytes with no newline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    found = read_metrics(run_dir / METRICS_FILE)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert (len(found.rows), found.bad_lines, found.partial_line) == (16, 1, False)
    assert grown_mib < 64, f"reading grew the process by {grown_mib:.0f} MiB"
    assert time.perf_counter() - start < 30
    data = _strict(runner.invoke(app, ["status", str(run_dir), "--json"]).stdout)
    assert (data["step"], data["ignored_lines"]) == (16, 1)


def test_an_overlong_line_is_counted_once_and_the_rows_after_it_kept(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    tail = MetricsTail(path)
    path.write_bytes(b'{"step": 1}\n' + b"x" * (MAX_LINE + 10))
    assert tail.read() == [{"step": 1}]
    with path.open("ab") as handle:
        handle.write(b"y" * (3 * MAX_LINE) + b'\n{"step": 2}\n')
    assert tail.read() == [{"step": 2}]
    assert tail.read_so_far.bad_lines == 1


def test_garbage_lists_and_negative_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path)
    with (run_dir / METRICS_FILE).open("ab") as handle:
        handle.write(os.urandom(3000).replace(b"\n", b" ") + b"\n\xff\xfe\x00\n")
        handle.write(b'[1, 2]\n"text"\n{"step": "7"}\n{"step": -5, "loss/laion": 1.0}\n')
    data = _strict(runner.invoke(app, ["status", str(run_dir), "--json"]).stdout)
    assert (data["step"], data["ignored_lines"]) == (16, 6)
    text = _no_traceback(runner.invoke(app, ["status", str(run_dir)]))
    assert "note: 6 line(s) of metrics.jsonl are not metrics rows" in text


def test_non_finite_values_show_and_json_stays_json(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path)
    row = (
        '{"step": 17, "loss/laion": NaN, "loss/mmc4": Infinity, "samples_per_s": -Infinity, '
        '"epoch": Infinity, "dropped/laion/bad_image": NaN, "dropped/mmc4/bad_image": 1e400}\n'
    )
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(row)
    result = runner.invoke(app, ["status", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = _strict(result.stdout)
    assert data["datasets"]["laion"]["loss"] is None  # NaN: JSON has no NaN
    assert data["datasets"]["mmc4"]["loss"] is None
    assert (data["datasets"]["laion"]["dropped"], data["epoch"], data["step"]) == (0, None, 17)
    assert data["last_metrics"]["samples_per_s"] is None
    text = _no_traceback(runner.invoke(app, ["status", str(run_dir)]))
    assert "laion nan" in text and "mmc4 inf" in text


def test_a_file_given_as_the_run_dir_is_named(tmp_path: Path) -> None:
    target = tmp_path / "metrics.jsonl"
    target.write_text('{"step": 1}\n', encoding="utf-8")
    result = runner.invoke(app, ["status", str(target)])
    assert result.exit_code == 1
    text = _no_traceback(result)
    assert f"{target} is a file, not a run directory or a recipe (.toml)" in text
    assert "fix: give a run directory" in text


def test_a_non_utf8_run_dir_name_prints(tmp_path: Path) -> None:
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff\xfe"))
    run_dir = fake_run(odd)
    result = runner.invoke(app, ["status", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path}/\\udcff\\udcfe/tiny-cpu" in "".join(result.output.split())
    assert "finished at step 16" in result.output


def test_a_damaged_finished_file_and_kept_recipe_do_not_stop_status(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path)
    (run_dir / "FINISHED").write_text("١٢", encoding="utf-8")  # digits, not ASCII ones
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    (newest / "recipe.toml").write_text("[[[ not toml", encoding="utf-8")
    (newest / "meta.json").write_text("{broken", encoding="utf-8")
    result = runner.invoke(app, ["status", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = _strict(result.stdout)
    assert (data["detail"], data["total_steps"], data["recipe"]) == (
        "finished at step 16",
        0,
        None,
    )


def test_follow_on_a_run_dir_deleted_meanwhile_stops_with_a_message(tmp_path: Path) -> None:
    run_dir = fake_run(tmp_path, last=10, checkpoints=(8,), finished=False)
    lock = acquire_run_lock(run_dir)

    def delete() -> None:
        time.sleep(0.5)
        lock.release()
        shutil.rmtree(run_dir)

    thread = threading.Thread(target=delete)
    thread.start()
    result = runner.invoke(app, ["status", str(run_dir), "--follow", "--interval", "0.1"])
    thread.join()
    assert result.exit_code == 1
    text = _no_traceback(result)
    assert f"{run_dir} is gone: it was removed or moved while status read it" in text
