"""Siblings of the hardening cases, found in a red-team pass over the fix: the same faults in
other commands and other kinds of input (a recipe path that is a FIFO or a device, ...)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.recipe import load as recipe_load

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", [["validate-config"], ["inspect-shards", "--recipe"]])
def test_a_recipe_that_is_a_fifo_is_refused_without_blocking(
    tmp_path: Path, command: list[str]
) -> None:
    fifo = tmp_path / "recipe.toml"
    os.mkfifo(fifo)  # nobody writes: reading it would block forever
    result = runner.invoke(app, [*command, str(fifo)])
    assert result.exit_code == 2, result.output
    assert flat(result.stderr) == (
        f"error: recipe {fifo} is not a regular file (a pipe, socket or device) "
        "fix: write the recipe to a .toml file and give its path"
    )


@pytest.mark.parametrize("command", ["validate-config", "train", "eval-loss"])
def test_a_recipe_that_is_a_device_is_refused_as_json(command: str) -> None:
    # /dev/zero never ends: reading it whole would fill memory
    args = {
        "validate-config": ["--json", "/dev/zero"],
        "train": ["/dev/zero"],
        "eval-loss": ["--json", "/dev/zero", "--checkpoint", "latest"],
    }[command]
    result = runner.invoke(app, [command, *args])
    assert result.exit_code == 2, result.output
    message = "recipe /dev/zero is not a regular file (a pipe, socket or device)"
    if command == "train":
        assert message in flat(result.stderr)
    else:
        assert json.loads(result.stdout) == {
            "ok": False,
            "error": message,
            "fix": "write the recipe to a .toml file and give its path",
        }


def test_a_huge_recipe_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recipe_load, "MAX_RECIPE_BYTES", 1000)
    path = tmp_path / "recipe.toml"
    path.write_text("# a comment\n" * 100, encoding="utf-8")  # 1,200 bytes
    result = runner.invoke(app, ["validate-config", str(path)])
    assert result.exit_code == 2, result.output
    assert flat(result.stderr) == (
        f"error: recipe {path} is 1,200 bytes, more than any recipe (at most 1,000) "
        "fix: give the recipe's .toml file (a shard, checkpoint or log is not a recipe)"
    )
