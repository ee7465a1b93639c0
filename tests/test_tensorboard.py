"""TensorBoard event files: the same scalars as metrics.jsonl, each step once across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.train.metrics import TENSORBOARD_DIR, TensorBoardSink
from flamingo_cli.train.run import train_rank

from .conftest import RECIPES

TINY = RECIPES / "tiny-cpu.toml"


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_training_writes_the_metrics_rows_as_scalars(tmp_path: Path) -> None:
    sets = [f"run.output_dir={tmp_path}", "run.log_every=1", "logging.tensorboard=true"]
    train_rank(load_recipe(TINY, [parse_override(s) for s in sets]), max_steps=3)
    run_dir = tmp_path / "tiny-cpu"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    scalars = _scalars(run_dir)
    for key in ("loss/laion", "loss/mmc4", "lr", "grad_norm", "skipped_steps"):
        assert [step for step, _ in scalars[key]] == [1, 2, 3]
        expected = [row[key] for row in rows]
        assert [value for _, value in scalars[key]] == pytest.approx(expected, rel=1e-6)


def test_a_resumed_run_purges_the_steps_it_does_again(tmp_path: Path) -> None:
    first = TensorBoardSink(tmp_path, resumed_step=0)
    for step in (1, 2, 3, 4):
        first.log(step, {"loss/laion": float(step), "note": "text is not a scalar"})
    first.close()
    resumed = TensorBoardSink(tmp_path, resumed_step=2)  # the checkpoint was at step 2
    for step in (3, 4, 5):
        resumed.log(step, {"loss/laion": 10.0 * step})
    resumed.close()
    assert _scalars(tmp_path) == {
        "loss/laion": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    }


def test_validate_names_a_missing_tensorboard_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    result = CliRunner().invoke(
        app, ["validate-config", str(TINY), "--set", "logging.tensorboard=true"]
    )
    assert result.exit_code == 1
    text = " ".join(result.stderr.split())
    assert "logging.tensorboard (from --set): TensorBoard logging needs the tensorboard" in text
    assert "fix: pip install 'flamingo[tensorboard]'" in text
