"""The CLI shell: exit codes, JSON, no tracebacks for user errors, no torch at import."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flamingo_cli import __version__
from flamingo_cli.cli.app import app

from .conftest import RECIPES, cli_in_fresh_interpreter

runner = CliRunner()
WriteRecipe = Callable[..., Path]


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"flamingo {__version__}"


def test_tiny_recipe_validates_with_plan() -> None:
    result = runner.invoke(app, ["validate-config", str(RECIPES / "tiny-cpu.toml")])
    assert result.exit_code == 0, result.output
    assert "batches per rank per epoch" in result.stdout
    assert "8 optimizer steps per epoch x 2 epoch(s) = 16 steps" in " ".join(result.stdout.split())


def test_json_output_is_the_plan(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["validate-config", str(RECIPES / "tiny-cpu.toml"), "--json", "--check-shards"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert data["problems"] == []
    laion, mmc4 = data["plan"]["datasets"]
    assert (laion["name"], laion["batches_per_rank"], laion["total_samples"]) == ("laion", 8, 64)
    assert (mmc4["name"], mmc4["batches_per_rank"], mmc4["total_samples"]) == ("mmc4", 8, 32)
    assert data["plan"]["total_optimizer_steps"] == 16
    assert data["counts"]["laion"]["from_sizes_json"] == 64


def test_recipe_errors_exit_1_without_traceback(write_recipe: WriteRecipe) -> None:
    path = write_recipe('[model]\npreset = "tiny"\n[data.laion]\nshards = "x.tar"\nbatchsize = 3\n')
    result = runner.invoke(app, ["validate-config", str(path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert f"{path}:5: data.laion.batchsize: unknown key; did you mean 'batch_size'?" in " ".join(
        result.stderr.split()
    )


def test_json_reports_problems_with_lines(write_recipe: WriteRecipe) -> None:
    path = write_recipe(
        '[model]\npreset = "tiny"\n[data.mmc4]\nshards = "nope/{0..1}.tar"\n[optim]\nwarmup_steps = 0\n'
    )
    result = runner.invoke(app, ["validate-config", str(path), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert [(p["key"], p["line"], p["severity"]) for p in data["problems"]] == [
        ("data.mmc4.shards", 4, "error")
    ]


def test_json_reports_typing_problems(write_recipe: WriteRecipe) -> None:
    path = write_recipe('[model]\npreset = "tiny"\n[data.laion]\nshards = "x.tar"\nbatchsize = 3\n')
    result = runner.invoke(app, ["validate-config", str(path), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False
    # the shard rules run too, although the recipe did not type-check
    assert [(p["key"], p["line"]) for p in data["problems"]] == [
        ("data.laion.batchsize", 5),
        ("data.laion.shards", 4),
    ]


def test_set_and_world_size_options(write_recipe: WriteRecipe) -> None:
    args = ["validate-config", str(RECIPES / "tiny-cpu.toml"), "--json", "--nproc-per-node", "2"]
    result = runner.invoke(app, [*args, "--set", "data.laion.train_num_samples=16"])
    data = json.loads(result.stdout)
    assert result.exit_code == 1
    keys = [(p["key"], p["severity"]) for p in data["problems"]]
    # laion: ceil(16 / (8 * 2)) = 1 batch, mmc4: ceil(32 / (4 * 2)) = 4; and the tiny recipe's
    # strategy "none" cannot run 2 processes. The shard rules pass: the tiny recipe resamples.
    assert keys == [("data.mmc4.train_num_samples", "error"), ("distributed.strategy", "error")]
    assert "laion 1 " in data["problems"][0]["message"]
    assert "mmc4 4 " in data["problems"][0]["message"]
    assert data["plan"]["world_size"] == 2
    bad = runner.invoke(app, [*args, "--set", "optim.lr=-1"])
    assert bad.exit_code == 1
    (problem,) = json.loads(bad.stdout)["problems"]
    assert (problem["key"], problem["source"], problem["line"]) == ("optim.lr", "from --set", None)
    plain = runner.invoke(app, [*args[:-3], "--set", "optim.lr=-1"])
    assert "optim.lr (from --set): Input should be greater than 0" in plain.stderr


def test_usage_errors_exit_2() -> None:
    assert runner.invoke(app, ["validate-config"]).exit_code == 2
    assert runner.invoke(app, ["validate-config", "no/such/recipe.toml"]).exit_code == 2
    bad_set = runner.invoke(app, ["validate-config", str(RECIPES / "tiny-cpu.toml"), "--set", "x"])
    assert bad_set.exit_code == 2
    assert "--set expects KEY=VALUE" in bad_set.stderr
    assert runner.invoke(app, ["validate-config", "--bogus"]).exit_code == 2


def test_debug_shows_the_traceback() -> None:
    result = runner.invoke(app, ["--debug", "validate-config", "no/such/recipe.toml"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_from_openflamingo_writes_a_recipe(tmp_path: Path) -> None:
    command = (Path(__file__).parent / "data" / "openflamingo_readme_command.txt").read_text()
    out = tmp_path / "of.toml"
    result = runner.invoke(
        app, ["validate-config", "--from-openflamingo", command, "--out", str(out), "--json"]
    )
    assert result.exit_code == 1  # /path/to/shards does not exist here
    data = json.loads(result.stdout)
    assert {p["key"] for p in data["problems"]} == {"data.laion.shards", "data.mmc4.shards"}
    assert out.read_text().startswith("[model]\n")


@pytest.mark.parametrize(
    "args",
    [["--help"], ["validate-config", str(RECIPES / "tiny-cpu.toml"), "--check-shards"]],
)
def test_no_torch_import(args: list[str]) -> None:
    _, loaded = cli_in_fresh_interpreter(args)
    assert not loaded & {"torch", "transformers", "open_clip", "webdataset"}, loaded


def test_python_dash_m_runs_the_app() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flamingo_cli", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"flamingo {__version__}"


def test_no_colour_codes_when_piped() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flamingo_cli", "validate-config", str(RECIPES / "tiny-cpu.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert "\x1b[" not in done.stdout + done.stderr


def test_format_bytes() -> None:
    from flamingo_cli.ui.console import format_bytes

    assert [format_bytes(n) for n in (512, 1536, 40 * 2**30, 3 * 2**40)] == [
        "512 B",
        "1.5 KiB",
        "40.0 GiB",
        "3.0 TiB",
    ]


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_work_after_the_subcommand(where: str) -> None:
    recipe = str(RECIPES / "tiny-cpu.toml")
    args = ["validate-config", recipe]
    quiet = runner.invoke(app, ["-q", *args] if where == "before" else [*args, "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == ""  # no plan
    assert quiet.stderr == ""  # no "ok" line
    verbose = runner.invoke(app, [*args, "-v"] if where == "after" else ["-v", *args])
    assert "ok: " in verbose.stderr


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.toml")
    plain = runner.invoke(app, ["validate-config", missing])
    assert plain.exit_code == 2
    assert "Traceback" not in plain.output
    debug = runner.invoke(app, ["validate-config", missing, "--debug"])
    assert debug.exit_code == 2
    assert "Traceback" in debug.stderr


def test_convert_takes_quiet_after_its_subcommand(tmp_path: Path) -> None:
    absent, out = str(tmp_path / "absent.zip"), str(tmp_path / "out")
    result = runner.invoke(
        app, ["convert", "mmc4", absent, "--image-dir", str(tmp_path), "--out", out, "-q"]
    )
    assert "No such option" not in result.output
    assert result.exit_code == 1  # nothing to convert, reported; the option was accepted
    assert "no input" in " ".join(result.stderr.split()).lower()


def test_torchrun_shows_its_summary_only_for_a_rank_that_crashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch.distributed.run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from flamingo_cli.cli import torchrun

    crash = tmp_path / "error.json"
    crash.write_text(
        json.dumps(
            {
                "message": {
                    "message": "RuntimeError: a bug",
                    "extraInfo": {"py_callstack": "Traceback: a bug", "timestamp": "0"},
                }
            }
        ),
        encoding="utf-8",
    )
    for error_file, shown in ((str(tmp_path / "none.json"), False), (str(crash), True)):
        failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=error_file)

        def run(args: object, failure: ProcessFailure = failure) -> None:
            raise ChildFailedError("flamingo_cli", {0: failure})

        monkeypatch.setattr(torch_run, "run", run)
        assert torchrun.main(["--nproc-per-node", "1", "-m", "flamingo_cli"]) == 1
        assert ("a bug" in capsys.readouterr().err) == shown


@pytest.mark.parametrize(
    ("args", "error", "where"),
    [
        (["eval-loss", "r.toml", "--json", "--bogus"], "No such option: --bogus", "eval-loss"),
        (["convert", "mmc4", "--json", "--nope", "x"], "No such option: --nope", "convert mmc4"),
        (["status", "--json"], "Missing argument", "status"),
        (
            ["eval-loss", "r.toml", "--json", "--nproc-per-node", "two"],
            "Invalid value",
            "eval-loss",
        ),
    ],
)
def test_a_command_line_that_does_not_parse_is_json_under_json(
    args: list[str], error: str, where: str
) -> None:
    """Scripts reading --json get the error as data even when click rejects the line; the
    usual message still goes to stderr, exit 2."""
    result = runner.invoke(app, args, prog_name="flamingo")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["error"].startswith(error), data
    assert data["fix"] == f"see `flamingo {where} --help`"
    assert error in result.stderr
    plain = runner.invoke(app, [a for a in args if a != "--json"], prog_name="flamingo")
    assert plain.exit_code == 2 and plain.stdout == ""


def test_json_output_is_json_a_strict_parser_reads(capsys: pytest.CaptureFixture[str]) -> None:
    """NaN and infinities (a diverged loss, say) print as null, not as NaN/Infinity."""
    from flamingo_cli.ui.console import print_json

    print_json({"loss": float("nan"), "curve": [1.5, float("inf")], "low": (float("-inf"),)})

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    data = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert data == {"loss": None, "curve": [1.5, None], "low": [None]}
