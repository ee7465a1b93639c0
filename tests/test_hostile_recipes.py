"""Recipes a careless user or an attacker writes: non-finite values, absurd batch sizes,
binary and Latin-1 files, a byte-order mark, `pipe:` flags, and `--json` on fatal errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.errors import ProblemsFound, UsageError
from flamingo_cli.recipe.load import load_recipe
from flamingo_cli.recipe.plan import image_size, make_plan
from flamingo_cli.recipe.rules import _memory_rules
from flamingo_cli.recipe.schema import ModelConfig
from flamingo_cli.recipe.validate import validate_recipe

from .conftest import RECIPES

runner = CliRunner()
WriteRecipe = Callable[..., Path]

BASE = """
[model]
preset = "tiny"

[data.laion]
shards = "{root}/laion/{00000..00003}.tar"
batch_size = 4
train_num_samples = 32
max_tokens = 16
"""


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("optim.lr", "inf"),
        ("optim.lr", "nan"),
        ("optim.max_grad_norm", "inf"),
        ("data.laion.loss_multiplier", "nan"),
        ("data.laion.loss_multiplier", "-inf"),
    ],
)
def test_non_finite_floats_are_rejected(write_recipe: WriteRecipe, key: str, value: str) -> None:
    path = write_recipe(BASE)
    result = runner.invoke(app, ["validate-config", str(path), "--set", f"{key}={value}"])
    assert result.exit_code == 1, result.output
    assert f"{key} (from --set): Input should be a finite number" in flat(result.stderr)


def test_non_finite_float_in_the_file_names_its_line(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE + "\n[optim]\nlr = inf\n")
    with pytest.raises(ProblemsFound) as found:
        load_recipe(path)
    (problem,) = found.value.problems
    assert (problem.key, problem.line) == ("optim.lr", 11)
    assert "finite" in problem.message


def test_a_batch_of_pixels_beyond_memory_warns_in_validate(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE + "\n")
    result = runner.invoke(
        app, ["validate-config", str(path), "--set", "data.laion.batch_size=1e11", "--json"]
    )
    assert result.exit_code == 0, result.output  # a login node may be smaller than the nodes
    problems = json.loads(result.stdout)["problems"]
    memory = [p for p in problems if "one batch of images takes" in p["message"]]
    assert len(memory) == 1
    assert memory[0]["severity"] == "warning"
    assert memory[0]["key"] == "data.laion.batch_size"
    # 1e11 samples x 3 x 32 x 32 float32 pixels (the tiny encoder takes 32 px images)
    assert "1117.6 TiB per node" in memory[0]["message"]


def test_a_batch_of_pixels_beyond_memory_stops_train(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE)
    result = runner.invoke(app, ["train", str(path), "--set", "data.laion.batch_size=1e11"])
    assert result.exit_code == 1, result.output
    text = flat(result.stderr)
    assert "error: data.laion.batch_size (from --set): one batch of images takes" in text
    assert "fix: lower the batch sizes" in text
    assert "Traceback" not in result.output


def test_memory_rule_figures(write_recipe: WriteRecipe) -> None:
    loaded = load_recipe(write_recipe(BASE))
    plan = make_plan(loaded.recipe)
    (laion,) = plan.datasets
    assert laion.batch_pixel_bytes == 4 * 3 * 32 * 32 * 4
    assert _memory_rules(loaded, plan, laion.batch_pixel_bytes, training=True) == []
    (problem,) = _memory_rules(loaded, plan, laion.batch_pixel_bytes - 1, training=True)
    assert problem.severity == "error"
    assert "48.0 KiB per node (laion 4 x 12.0 KiB per sample, x 1 process(es))" in problem.message


def test_image_size_comes_from_open_clip_configs() -> None:
    assert image_size(ModelConfig(preset="tiny")) == 32
    assert image_size(ModelConfig(vision_encoder="ViT-L-14")) == 224
    assert image_size(ModelConfig(vision_encoder="ViT-H-14-378-quickgelu")) == 378
    assert image_size(ModelConfig(vision_encoder="no-such-encoder")) == 224


def test_binary_recipe_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.toml"
    path.write_bytes(b"PK\x03\x04\x00\x00\x08\x00binary")
    with pytest.raises(UsageError, match="is a binary file, not TOML text"):
        load_recipe(path)
    result = runner.invoke(app, ["validate-config", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_latin1_recipe_names_the_line_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_bytes(b'[model]\npreset = "tiny"\n[run]\nname = "caf\xe9"\n')
    result = runner.invoke(app, ["validate-config", str(path)])
    assert result.exit_code == 1
    text = flat(result.stderr)
    assert f"{path}:4: byte 0xe9 is not UTF-8" in text
    assert "fix: re-save the file as UTF-8" in text
    assert "Traceback" not in result.output


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    text = (RECIPES / "tiny-cpu.toml").read_text(encoding="utf-8")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    loaded = load_recipe(bom)
    plain = load_recipe(RECIPES / "tiny-cpu.toml")
    assert loaded.recipe.model == plain.recipe.model
    assert loaded.recipe.optim == plain.recipe.optim
    assert loaded.lines == plain.lines


def test_schema_errors_and_shard_rules_are_reported_together(write_recipe: WriteRecipe) -> None:
    path = write_recipe(
        BASE.replace('"{root}/laion/{00000..00003}.tar"', '"pipe:cat {root}/laion/0.tar"')
        + '\n[data.mmc4]\nshards = "nowhere/{0..1}.tar"\nbatch_size = 0\n'
    )
    with pytest.raises(ProblemsFound) as found:
        validate_recipe(path)
    messages = {p.key: p.message for p in found.value.problems}
    assert messages["data.mmc4.batch_size"] == "Input should be greater than 0 (got 0)"
    assert messages["data.laion.shards"].startswith("1 `pipe:` spec(s) would run shell commands")
    assert messages["data.mmc4.shards"].startswith("2 of 2 local shard(s) do not exist")
    result = runner.invoke(app, ["validate-config", str(path)])
    assert result.exit_code == 1
    assert "3 error(s), 0 warning(s)" in result.stderr


def test_allow_pipe_flag_on_every_command_that_reads_shards(write_recipe: WriteRecipe) -> None:
    path = write_recipe(
        BASE.replace('"{root}/laion/{00000..00003}.tar"', '"pipe:cat {root}/laion/0000{0..3}.tar"')
    )
    refused = runner.invoke(app, ["validate-config", str(path)])
    assert refused.exit_code == 1
    assert "set data.allow_pipe = true (or pass --allow-pipe)" in flat(refused.stderr)
    allowed = runner.invoke(app, ["validate-config", str(path), "--allow-pipe", "--json"])
    assert allowed.exit_code == 0, allowed.output
    for command in ("train", "eval-loss"):
        result = runner.invoke(app, [command, "--help"])
        assert "--allow-pipe" in result.stdout, command


def test_json_fatal_error_prints_json(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = runner.invoke(app, ["eval-loss", str(missing), "--checkpoint", "latest", "--json"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data == {
        "ok": False,
        "error": f"recipe {missing} does not exist",
        "fix": "check the path",
    }


def test_json_fatal_error_carries_every_problem(write_recipe: WriteRecipe) -> None:
    path = write_recipe(BASE + "\n[optim]\nlr = nan\n")
    result = runner.invoke(app, ["eval-loss", str(path), "--checkpoint", "latest", "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert [p["key"] for p in data["problems"]] == ["optim.lr"]


@pytest.mark.parametrize(
    "command",
    [
        ["convert", "laion", "{tmp}/absent", "--out", "{tmp}/out"],
        ["convert", "mmc4", "{tmp}/absent.zip", "--image-dir", "{tmp}", "--out", "{tmp}/out"],
        ["quickstart", "--dir", "{tmp}/busy"],
        ["validate-config", "{tmp}/absent.toml"],
    ],
)
def test_json_fatal_error_on_every_command(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "unrelated.txt").write_text("x", encoding="utf-8")
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code in (1, 2), result.output
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert data["error"] and data["fix"], data
