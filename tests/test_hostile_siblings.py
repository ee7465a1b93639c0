"""Siblings of the hardening cases, found in a red-team pass over the fix: the same faults in
other commands and other kinds of input (a recipe path that is a FIFO or a device, ...)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.errors import FlamingoError
from flamingo_cli.recipe import load as recipe_load
from flamingo_cli.runtime.run_lock import LOCK_FILE, acquire_run_lock, read_lock

from .conftest import RECIPES

runner = CliRunner()
TINY = RECIPES / "tiny-cpu.toml"


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


# --- .pt weights files: eval-loss --checkpoint FILE and model.init_from = FILE --------------


class _Touch:
    """What a crafted pickle does when it is loaded: here, create a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.target,))


_PT_FIX = (
    "fix: give a checkpoint directory, an exported flamingo.pt or an OpenFlamingo checkpoint.pt"
)


def _eval_file(checkpoint: Path) -> tuple[int, str]:
    args = ["eval-loss", str(TINY), "--checkpoint", str(checkpoint), "--max-batches", "1"]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, flat(result.output)


def test_a_crafted_pt_file_is_named_without_torchs_advice_to_unpickle_it(tmp_path: Path) -> None:
    marker, weights = tmp_path / "ran", tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": _Touch(marker)}, weights)
    code, output = _eval_file(weights)
    assert (code, marker.exists()) == (1, False)
    assert output == (
        f"error: cannot read {weights} as a weights file (Unsupported global: GLOBAL getattr "
        "was not an allowed global by default.): it is damaged, or not a weights file; "
        f"nothing from it was run {_PT_FIX}"
    )
    assert "weights_only" not in output and "add_safe_globals" not in output


def test_an_empty_pt_file_says_what_failed(tmp_path: Path) -> None:
    weights = tmp_path / "flamingo.pt"
    weights.write_bytes(b"")
    assert _eval_file(weights) == (
        1,
        f"error: cannot read {weights} as a weights file (EOFError): it is damaged, or not a "
        f"weights file; nothing from it was run {_PT_FIX}",
    )


def test_a_pt_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    weights = tmp_path / "flamingo.pt"
    os.mkfifo(weights)
    assert _eval_file(weights) == (
        1,
        f"error: {weights} is not a regular file (a pipe, socket or device) {_PT_FIX}",
    )


@pytest.mark.parametrize(
    ("state", "shown"),
    [
        ({1: torch.zeros(1)}, "1 is a key that is not a name (Tensor)"),
        ({"perceiver.latents": 3}, "'perceiver.latents' is not a tensor (int)"),
    ],
)
def test_a_pt_file_of_other_entries_is_not_a_state_dict(
    tmp_path: Path, state: dict[Any, Any], shown: str
) -> None:
    weights = tmp_path / "checkpoint.pt"
    torch.save(state, weights)
    assert _eval_file(weights) == (
        1,
        f"error: the checkpoint's entry {shown}: the file does not hold a state dict of "
        "weights fix: give the checkpoint.pt of an OpenFlamingo model, a flamingo.pt export "
        "or a checkpoint directory",
    )


# --- run.lock that is not a lock file --------------------------------------------------------


def test_a_lock_path_that_is_a_directory_is_named_and_left_alone(tmp_path: Path) -> None:
    lock = tmp_path / "run" / LOCK_FILE
    (lock / "notes").mkdir(parents=True)  # someone's directory: must not be moved or removed
    with pytest.raises(FlamingoError) as caught:
        acquire_run_lock(tmp_path / "run")
    assert (caught.value.message, caught.value.fix) == (
        f"the lock file of the run directory {tmp_path / 'run'} is a directory: {lock}",
        f"remove or rename the directory {lock} (flamingo writes a file there)",
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]
    assert (lock / "notes").is_dir()


@pytest.mark.parametrize("content", [b"", b"\xff\xfe garbage {", b'{"host": 1}', b"[1, 2]"])
def test_an_unreadable_old_lock_file_is_replaced(tmp_path: Path, content: bytes) -> None:
    lock = tmp_path / LOCK_FILE
    lock.write_bytes(content)
    os.utime(lock, (time.time() - 60, time.time() - 60))  # not one being written just now
    with acquire_run_lock(tmp_path) as held:
        assert held.took_over == f"replaced the unreadable lock file {lock}"
        assert getattr(read_lock(tmp_path), "token", None) == held.holder.token
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- --json on fatal errors of the multi-process paths ---------------------------------------


def test_eval_loss_json_prints_a_failed_multi_process_evaluation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flamingo_cli.runtime import launch

    monkeypatch.setattr(launch, "run_torchrun", lambda cmd, env=None: 1)  # a rank failed
    args = ["eval-loss", "--json", str(TINY), "--checkpoint", "latest", "--nproc-per-node", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    logs = report["fix"].removeprefix("see rank 0's error above; every rank's log is under ")
    assert report == {
        "ok": False,
        "error": "evaluation failed (exit 1)",
        "fix": f"see rank 0's error above; every rank's log is under {logs}",
    }
    assert Path(logs).name == "logs" and Path(logs).parent.name.startswith("flamingo-eval-")


def test_eval_shards_that_name_no_shard_get_a_fix(tmp_path: Path) -> None:
    from flamingo_cli.model.factory import build_model
    from flamingo_cli.recipe.schema import ModelConfig
    from tests.model_util import export

    weights = export(build_model(ModelConfig(preset="tiny"))[0], tmp_path).openflamingo
    folder = tmp_path / "shards.tar"  # a directory named like a shard, holding none
    folder.mkdir()
    args = ["eval-loss", str(TINY), "--checkpoint", str(weights), "--shards", str(folder)]
    result = runner.invoke(app, [*args, "--dataset", "laion"])
    assert result.exit_code == 1, result.output
    assert flat(result.stderr) == (
        f"error: the laion eval shards '{folder}' name no shard fix: give .tar files: a brace "
        "spec (dir/{00000..00009}.tar), a glob, or a folder holding .tar shards"
    )


# --- JSON and TOML nested deeper than Python's recursion limit -------------------------------

DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
DEEP_ARRAY_ERROR = (
    "maximum recursion depth exceeded while decoding a JSON array from a unicode string"
)


def _deep_docs(path: Path) -> Path:
    from flamingo_cli.shards.write import write_tar

    write_tar(
        path, [{"__key__": "deep", "json": DEEP_ARRAY}, {"__key__": "obj", "json": DEEP_OBJECT}]
    )
    return path


def test_inspect_deep_reports_json_nested_too_deeply(tmp_path: Path) -> None:
    shard = _deep_docs(tmp_path / "docs.tar")
    result = runner.invoke(
        app, ["inspect-shards", "--json", "--deep", "--workers", "1", str(shard)]
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    found = [(f["key"], f["check"], f["reason"]) for f in report["findings"]]
    assert found == [
        ("deep", "json", f"invalid JSON: {DEEP_ARRAY_ERROR}"),
        ("obj", "json", f"invalid JSON: {DEEP_ARRAY_ERROR.replace('array', 'object')}"),
    ]


def test_preview_of_json_nested_too_deeply(tmp_path: Path) -> None:
    shard = _deep_docs(tmp_path / "docs.tar")
    page = tmp_path / "preview.html"
    result = runner.invoke(
        app, ["inspect-shards", "--workers", "1", str(shard), "--preview", str(page)]
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and page.stat().st_size > 0


def test_loaders_drop_json_nested_too_deeply_as_bad_json() -> None:
    from flamingo_cli.data.preprocess import Dropped, preprocess_document

    with pytest.raises(Dropped, match="bad_json"):
        preprocess_document({"__key__": "deep", "json": DEEP_ARRAY}, None, None, None)  # type: ignore[arg-type]


def test_convert_mmc4_skips_a_line_nested_too_deeply(tmp_path: Path) -> None:
    import zipfile

    docs = tmp_path / "docs_shard_0_v2.jsonl.zip"
    with zipfile.ZipFile(docs, "w") as archive:
        archive.writestr("docs_shard_0_v2.jsonl", DEEP_ARRAY + b"\n")
    (tmp_path / "images").mkdir()
    args = ["convert", "mmc4", str(docs), "--image-dir", str(tmp_path / "images")]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (f"warning: {docs}:1: not a JSON document ({DEEP_ARRAY_ERROR}); line skipped") in flat(
        result.stderr
    )


def test_convert_laion_names_a_table_line_nested_too_deeply(tmp_path: Path) -> None:
    table = tmp_path / "pairs.jsonl"
    table.write_bytes(b'{"url": "x", "caption": ' + DEEP_ARRAY + b"}\n")
    result = runner.invoke(app, ["convert", "laion", str(table), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert flat(result.stderr) == (
        f"error: {table}:1: not a JSON object ({DEEP_ARRAY_ERROR}) fix: repair the line"
    )


def test_a_recipe_nested_too_deeply(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text("a = " + "[" * 50_000 + "]" * 50_000 + "\n", encoding="utf-8")
    result = runner.invoke(app, ["validate-config", str(path)])
    assert result.exit_code == 1, result.output
    assert flat(result.stderr) == (
        f"error: {path}: not a recipe: arrays or tables nest too deeply 1 error(s), 0 warning(s)"
    )
    deep = "[" * 50_000 + "]" * 50_000
    result = runner.invoke(app, ["validate-config", str(TINY), "--set", f"optim.lr={deep}"])
    assert result.exit_code == 1, result.output
    assert "optim.lr (from --set): Input should be a valid number" in flat(result.stderr)


def test_files_beside_shards_and_in_run_directories_nested_too_deeply(tmp_path: Path) -> None:
    from flamingo_cli.errors import CheckpointDamaged, OpenerError
    from flamingo_cli.shards.sizes import read_sizes
    from flamingo_cli.train.checkpoint import _read_json
    from flamingo_cli.train.metrics import set_aside_rows_after

    (tmp_path / "sizes.json").write_bytes(DEEP_ARRAY)  # sizes.json of downloaded shards
    with pytest.raises(OpenerError, match=f"sizes.json is not valid JSON: {DEEP_ARRAY_ERROR}"):
        read_sizes(str(tmp_path))
    meta = tmp_path / "meta.json"  # in a crafted checkpoint directory
    meta.write_bytes(DEEP_ARRAY)
    with pytest.raises(CheckpointDamaged) as caught:
        _read_json(meta)
    assert caught.value.message == f"{meta} is damaged: {DEEP_ARRAY_ERROR}"
    lock = tmp_path / "run" / LOCK_FILE
    lock.parent.mkdir()
    lock.write_bytes(DEEP_ARRAY)
    assert read_lock(lock.parent) is None  # unreadable: replaced once it is old
    rows = tmp_path / "metrics.jsonl"
    rows.write_bytes(b'{"step": 1}\n' + DEEP_ARRAY + b'\n{"step": 2}\n')
    aside = set_aside_rows_after(rows, 1)
    assert aside is not None and aside.rows == 2
    assert rows.read_bytes() == b'{"step": 1}\n'


# --- quickstart --dir that cannot be made ----------------------------------------------------


@pytest.mark.parametrize("json_", [False, True])
def test_quickstart_dir_under_a_file_is_named(tmp_path: Path, json_: bool) -> None:
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    target = tmp_path / "afile" / "sub"
    result = runner.invoke(
        app, ["quickstart", "--dir", str(target), *(["--json"] if json_ else [])]
    )
    assert result.exit_code == 2, result.output
    message = f"--dir {target} cannot be made: {tmp_path / 'afile'} is a file, not a directory"
    fix = "give a directory path whose parents are directories"
    if json_:
        assert json.loads(result.stdout) == {"ok": False, "error": message, "fix": fix}
    else:
        assert flat(result.stderr) == f"error: {message} fix: {fix}"
