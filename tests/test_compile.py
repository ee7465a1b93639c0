"""run.compile = true: regional torch.compile of each repeated block, before sharding, with the
eager step's losses (docs/formats.md §12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flamingo_cli.model.factory import tiny_lm
from flamingo_cli.recipe.load import load_recipe, parse_override
from flamingo_cli.runtime.distributed import DistInfo, apply_parallelism, repeated_blocks

from .conftest import RECIPES, REPO
from .model_util import wrap

GOLDEN = Path(__file__).parent / "data" / "tiny_cpu_losses.jsonl"


def test_the_repeated_blocks_are_compiled_in_place_with_their_names() -> None:
    model = wrap(tiny_lm())
    names = [name for name, _ in model.named_parameters()]
    blocks = repeated_blocks(model)
    vision = model.vision_encoder.transformer.resblocks
    expected = [*vision, *model.perceiver.layers, *model.decoder_layers]
    assert [id(b) for b in blocks] == [id(b) for b in expected]
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    wrapped = apply_parallelism(
        model, [], strategy="none", sharding="full", precision="fp32", info=info, compiled=blocks
    )
    assert wrapped is model
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints unchanged


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_losses(tmp_path: Path) -> None:
    """Three steps of the tiny recipe, compiled and with activation checkpointing (which
    changes no number), against the eager steps' recorded losses."""
    overrides = [
        f"run.output_dir={tmp_path}",
        "run.compile=true",
        "model.gradient_checkpointing=true",
    ]
    loaded = load_recipe(RECIPES / "tiny-cpu.toml", [parse_override(o) for o in overrides])
    from flamingo_cli.train.run import train_rank

    torch.compiler.reset()
    try:
        train_rank(loaded, max_steps=3)
    finally:
        torch.compiler.reset()
    lines = (tmp_path / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()
    got = [json.loads(line) for line in lines]
    want = [json.loads(line) for line in GOLDEN.read_text().splitlines()][:3]
    assert [g["step"] for g in got] == [1, 2, 3]
    for g, w in zip(got, want, strict=True):
        for key in ("loss/laion", "loss/mmc4"):
            assert g[key] == pytest.approx(w[key], abs=1e-4), (g["step"], key)


def test_validate_names_a_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from typer.testing import CliRunner

    from flamingo_cli.cli.app import app

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    tiny = str(RECIPES / "tiny-cpu.toml")
    result = CliRunner().invoke(app, ["validate-config", tiny, "--set", "run.compile=true"])
    assert result.exit_code == 1
    text = " ".join(result.stderr.split())
    assert "run.compile (from --set): run.compile = true needs a C or C++ compiler" in text
    assert "fix: install one (e.g. apt-get install g++) or set run.compile = false" in text
    assert CliRunner().invoke(app, ["validate-config", tiny]).exit_code == 0


# the eager steps of the tiny recipe on two ranks (FSDP2 and DDP agree to 1e-6)
TWO_RANK_EAGER = [
    (6.1604413986206055, 6.282376766204834),
    (6.161433458328247, 6.281023979187012),
    (6.097361087799072, 6.278399705886841),
]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_compiled_ranks_give_the_eager_losses(tmp_path: Path, strategy: str) -> None:
    """Two ranks, blocks compiled before FSDP2 (with activation checkpointing) or DDP wrap them."""
    import os
    import subprocess
    import sys

    args = [
        *("train", str(RECIPES / "tiny-cpu.toml"), "--nproc-per-node", "2", "--max-steps", "3"),
        *("--set", f"run.output_dir={tmp_path}", "--set", f"distributed.strategy={strategy}"),
        *("--set", "run.compile=true", "--set", "model.gradient_checkpointing=true"),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "flamingo_cli", "-q", *args],
        capture_output=True,
        text=True,
        timeout=500,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()
    got = [(row["loss/laion"], row["loss/mmc4"]) for row in map(json.loads, lines)]
    assert len(got) == 3
    for pair, want in zip(got, TWO_RANK_EAGER, strict=True):
        assert pair == pytest.approx(want, abs=1e-4)
