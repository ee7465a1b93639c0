"""Checkpoint directories as an attacker or a careless user leaves them: a crafted index or
item that would run code, a checkpoint of another model layout, files cut short or missing;
and resume exactness for every trainable set.

One tiny run (2 steps, a checkpoint after each) is trained per module; each test copies its
checkpoints and damages the copy. The CLI runs through its real entry (typer's runner), so exit
codes and messages are what a user sees.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from typer.testing import CliRunner

from flamingo_cli.cli.app import app
from flamingo_cli.errors import CheckpointRefused, FlamingoError
from flamingo_cli.model.factory import build_model
from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.runtime.dcp_metadata import read_index
from flamingo_cli.runtime.distributed import DistInfo
from flamingo_cli.runtime.weights import load_weights
from flamingo_cli.train.checkpoint import TrainState, save_checkpoint
from flamingo_cli.train.run import train_rank

from .conftest import RECIPES

TINY = RECIPES / "tiny-cpu.toml"
STEP1, STEP2 = "step-00000001", "step-00000002"
ONE_PROCESS = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
runner = CliRunner()


class _Mkdir:
    """What a crafted pickle does when it is loaded: here, make a directory."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.target),))


def _train(out: Path, steps: int, *overrides: str) -> Path:
    sets = [f"run.output_dir={out}", "run.checkpoint_every=1", *overrides]
    train_rank(load_recipe(TINY, [parse_override(s) for s in sets]), max_steps=steps)
    return out / "tiny-cpu"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints step-1 and step-2 of the tiny recipe (cross-attention every layer)."""
    return _train(tmp_path_factory.mktemp("trained"), 2) / "checkpoints"


@pytest.fixture(scope="module")
def every_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A step-1 checkpoint of the tiny recipe with cross-attention every second layer."""
    out = tmp_path_factory.mktemp("every-two")
    return _train(out, 1, "model.cross_attn_every_n_layers=2") / "checkpoints" / STEP1


def _plant(checkpoints: Path, out: Path) -> Path:
    """A run directory under `out` holding a copy of `checkpoints`; returns the copy."""
    target = out / "tiny-cpu" / "checkpoints"
    shutil.copytree(checkpoints, target)
    return target


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


def _train_cli(out: Path, *sets: str) -> tuple[int, str]:
    extra = [a for s in sets for a in ("--set", s)]
    return _cli("train", str(TINY), "--set", f"run.output_dir={out}", *extra, "--max-steps", "3")


def _eval_cli(checkpoint: Path, *sets: str) -> tuple[int, str]:
    extra = [a for s in sets for a in ("--set", s)]
    return _cli(
        "eval-loss", str(TINY), "--checkpoint", str(checkpoint), "--max-batches", "1", *extra
    )


def _crafted_index(source: Path, directory: Path, marker: Path) -> None:
    """Give `directory` the index of `source` with a payload as its `version` field."""
    index = read_index(source)
    index.version = _Mkdir(marker)  # type: ignore[assignment]
    (directory / ".metadata").write_bytes(pickle.dumps(index))


# --- security: nothing in a checkpoint directory runs -------------------------------------


def test_plain_dcp_would_run_the_crafted_index(trained: Path, tmp_path: Path) -> None:
    """The hole being closed: torch's own reader runs the payload (so the tests below mean
    something), ours refuses it and runs nothing."""
    crafted = shutil.copytree(trained / STEP2, tmp_path / "ck")
    _crafted_index(trained / STEP2, crafted, tmp_path / "ran")
    FileSystemReader(crafted).read_metadata()
    assert (tmp_path / "ran").is_dir()
    _crafted_index(trained / STEP2, crafted, tmp_path / "ran-again")
    with pytest.raises(CheckpointRefused, match=r"holds (posix|os)\.mkdir, which no checkpoint"):
        read_index(crafted)
    with pytest.raises(CheckpointRefused, match="not written by flamingo"):
        read_index(crafted)
    assert not (tmp_path / "ran-again").exists()


@pytest.mark.parametrize("entry", ["eval-loss", "init_from", "resume"])
def test_a_crafted_index_runs_nothing_and_exits_1(
    trained: Path, tmp_path: Path, entry: str
) -> None:
    marker = tmp_path / "ran"
    out = tmp_path / "out"
    if entry == "resume":  # planted in the run directory: run.resume = "auto" finds it
        crafted = _plant(trained, out) / STEP2
        _crafted_index(trained / STEP2, crafted, marker)
        code, output = _train_cli(out)
    else:
        crafted = shutil.copytree(trained / STEP2, tmp_path / "ck")
        _crafted_index(trained / STEP2, crafted, marker)
        if entry == "eval-loss":
            code, output = _eval_cli(crafted)
        else:
            code, output = _train_cli(out, f"model.init_from={crafted}")
    assert code == 1, output
    assert not marker.exists()
    assert f"{crafted / '.metadata'}" in output
    assert "not written by flamingo (torch.distributed.checkpoint) or was crafted" in output
    assert not (out / "tiny-cpu" / "checkpoints" / "step-00000003").exists()


def _handmade(name: str) -> bytes:
    """Index pickles that use only allowed names, but in ways DCP never writes."""
    meta = b"ctorch.distributed.checkpoint.metadata\nMetadata\n"
    if name == "state on a class":  # BUILD with slot state: setattr on the class itself
        return meta + b"N}S'version'\nS'x'\ns\x86b."
    if name == "persistent id":
        return b"Pfoo\n."
    if name == "not an index":
        return pickle.dumps({"state_dict_metadata": {}})
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("state on a class", "state for a type"),
        ("persistent id", "a persistent reference"),
        ("not an index", "a dict, not an index"),
    ],
)
def test_index_tricks_are_refused(trained: Path, tmp_path: Path, name: str, message: str) -> None:
    directory = shutil.copytree(trained / STEP2, tmp_path / "ck")
    (directory / ".metadata").write_bytes(_handmade(name))
    with pytest.raises(CheckpointRefused, match=message):
        read_index(directory)
    assert torch.distributed.checkpoint.metadata.Metadata.__dict__.get("version") is None


def test_a_data_file_outside_the_directory_is_refused(trained: Path, tmp_path: Path) -> None:
    directory = shutil.copytree(trained / STEP2, tmp_path / "ck")
    index = read_index(directory)
    info = next(iter(index.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    (directory / ".metadata").write_bytes(pickle.dumps(index))
    with pytest.raises(CheckpointRefused, match=r"outside the directory \('../../etc/passwd'\)"):
        read_index(directory)


def test_a_crafted_item_runs_nothing(trained: Path, tmp_path: Path) -> None:
    """Non-tensor items (progress, schedule) go through torch.load in DCP's planner, with
    weights_only=False: an item holding a payload must be refused, not run."""
    directory = _plant(trained, tmp_path / "out") / STEP2
    marker = tmp_path / "ran"
    index = read_index(directory)
    data = directory / "__0_0.distcp"
    key = next(k for k in index.storage_data if k.fqn == "train.progress.step")
    payload = io.BytesIO()
    torch.save(_Mkdir(marker), payload)
    offset = data.stat().st_size
    with data.open("ab") as f:
        f.write(payload.getvalue())
    index.storage_data[key].offset = offset
    index.storage_data[key].length = len(payload.getvalue())
    (directory / ".metadata").write_bytes(pickle.dumps(index))
    code, output = _train_cli(tmp_path / "out")
    assert code == 1, output
    assert not marker.exists()
    module = os.mkdir.__module__  # posix, or nt
    assert (
        f"item 'train.progress.step' in {directory} is not plain data (Trying to load "
        f"unsupported GLOBAL {module}.mkdir whose module {module} is blocked.)"
    ) in output
    assert "weights_only` set to `False`" not in output


# --- lost work: every trainable set resumes exactly ---------------------------------------


def _losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: (m["loss/laion"], m["loss/mmc4"]) for m in rows}


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainable",
    [
        pytest.param(["model.train_backbones=true"], id="train_backbones"),
        pytest.param(["model.freeze_lm_embeddings=true"], id="freeze_lm_embeddings"),
        pytest.param([], id="frozen_backbones"),
    ],
)
def test_resume_is_exact_for_every_trainable_set(tmp_path: Path, trainable: list[str]) -> None:
    """train_backbones used to fail: a parameter no loss reaches (the vision projection) has
    no AdamW state when saved, and DCP asked the checkpoint for it."""
    straight = _train(tmp_path / "straight", 4, *trainable)
    _train(tmp_path / "resumed", 2, *trainable)
    resumed = _train(tmp_path / "resumed", 4, *trainable)
    assert sorted(_losses(resumed)) == [1, 2, 3, 4]
    assert _losses(resumed) == _losses(straight)


# --- silent wrong results: a checkpoint of another layout ---------------------------------


@pytest.mark.parametrize("entry", ["eval-loss", "resume"])
@pytest.mark.parametrize(
    ("saved", "loaded", "expected"),
    [
        (1, 2, "22 with no place in the model (no place for: lm.model.layers.0.gated_cross_attn"),
        (2, 1, "22 missing from it (missing: lm.model.layers.0.gated_cross_attn"),
    ],
)
def test_a_checkpoint_of_another_layout_does_not_fit(
    trained: Path,
    every_two: Path,
    tmp_path: Path,
    entry: str,
    saved: int,
    loaded: int,
    expected: str,
) -> None:
    source = trained / STEP2 if saved == 1 else every_two
    layout = f"model.cross_attn_every_n_layers={loaded}"
    if entry == "eval-loss":
        where = source
        code, output = _eval_cli(source, layout)
        fix = "fix: build the model as the checkpoint's run did"
    else:
        out = tmp_path / "out"
        where = out / "tiny-cpu" / "checkpoints" / source.name
        shutil.copytree(source, where)
        code, output = _train_cli(out, layout)
        fix = "fix: resume with the model settings it was trained with"
    assert code == 1, output
    assert f"the checkpoint {where} does not fit this model: {expected}" in output
    assert fix in output and "recipe.toml" in output


def test_backbones_a_checkpoint_trained_are_loaded_for_eval(tmp_path: Path) -> None:
    """A train_backbones checkpoint evaluated with a recipe that freezes them: its backbone
    weights load too (they used to be skipped, a silently wrong loss)."""
    recipe = load_recipe(TINY, [parse_override("model.train_backbones=true")]).recipe
    model, *_ = build_model(recipe.model, seed=0)
    with torch.no_grad():
        model.vision_encoder.conv1.weight.add_(1.0)
    optimizer = torch.optim.AdamW(model.parameters())
    state = TrainState(
        model,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        keep=lambda _: True,
        progress={"step": 1},
    )
    path = save_checkpoint(tmp_path, 1, state, {}, ONE_PROCESS, recipe_text="", keep_last=0)
    frozen, *_ = build_model(load_recipe(TINY).recipe.model, seed=0)
    assert load_weights(frozen, path) == "flamingo checkpoint"
    assert torch.equal(frozen.vision_encoder.conv1.weight, model.vision_encoder.conv1.weight)


# --- a damaged checkpoint that still has COMPLETE ----------------------------------------


def _damage(directory: Path, how: str) -> str:
    """Damage a checkpoint copy; returns the file the message must name."""
    data, index = directory / "__0_0.distcp", directory / ".metadata"
    if how == "truncated data":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        return f"{data} is truncated"
    if how == "zeroed data":
        blob = bytearray(data.read_bytes())
        blob[: len(blob) // 2] = bytes(len(blob) // 2)
        data.write_bytes(bytes(blob))
        return f"a tensor in {data} cannot be read (UnpicklingError): the data files of {directory} are damaged"
    if how == "no index":
        index.unlink()
        return f"{index} is missing"
    if how == "empty index":
        index.write_bytes(b"")
        return f"{index} is empty"
    if how == "cut index":
        index.write_bytes(index.read_bytes()[:1000])
        return f"{index} is damaged (truncated or overwritten)"
    name = {"no meta.json": "meta.json", "no rank file": "rank0.json"}[how]
    (directory / name).unlink()
    return f"{directory / name} is missing"


DAMAGE = [
    "truncated data",
    "zeroed data",
    "no index",
    "empty index",
    "cut index",
    "no meta.json",
    "no rank file",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_resume_from_a_damaged_checkpoint_names_it_and_the_older_one(
    trained: Path, tmp_path: Path, how: str
) -> None:
    out = tmp_path / "out"
    checkpoints = _plant(trained, out)
    named = _damage(checkpoints / STEP2, how)
    code, output = _train_cli(out)
    assert code == 1, output
    assert named in output
    assert (
        f"fix: delete {checkpoints / STEP2} (or move it aside) and run again to resume from "
        f'{checkpoints / STEP1}, or set run.resume = "{checkpoints / STEP1}"'
    ) in output
    # refused, not started over
    assert sorted(p.name for p in checkpoints.iterdir()) == [STEP1, STEP2]


@pytest.mark.parametrize("how", ["truncated data", "zeroed data", "empty index"])
def test_eval_of_a_damaged_checkpoint_names_it(trained: Path, tmp_path: Path, how: str) -> None:
    directory = shutil.copytree(trained / STEP2, tmp_path / "ck")
    named = _damage(directory, how)
    code, output = _eval_cli(directory)
    assert code == 1, output
    assert named in output
    assert "fix: give another checkpoint" in output


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"epoch,loss\n1,0.5\n", "not a file torch.save writes (IndexError: pop from empty"),
        (b"hello\n", "not a file torch.save writes (KeyError: 101)"),
        (b"\x80\x02", "EOFError"),
        (b"PK\x03\x04 not really a zip", "PytorchStreamReader failed reading zip archive"),
    ],
)
def test_a_file_torch_save_never_wrote_is_named_as_no_weights_file(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    """A text file given as weights was a KeyError traceback: torch's weights-only unpickler
    fails on its first byte in its own way."""
    model, *_ = build_model(load_recipe(TINY).recipe.model, seed=0)
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(FlamingoError) as caught:
        load_weights(model, path)
    assert caught.value.message.startswith(f"cannot read {path} as a weights file ({reason}")
    assert "nothing from it was run" in caught.value.message
